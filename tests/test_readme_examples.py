"""The README's code blocks run as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first python block after ``heading`` in the README."""
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_lgvq_around_your_own_tokenizer_trains_a_step(capsys):
    torch.manual_seed(0)
    namespace = {}
    exec(compile(readme_block("### LG-VQ around your own tokenizer"), "README.md", "exec"),
         namespace)
    output = namespace["output"]
    assert torch.isfinite(output.loss) and output.loss.dim() == 0
    assert output.reconstruction.shape == (4, 3, 32, 32)
    assert output.indices.shape == (4, 8, 8)
    language = output.language
    assert bool(language.masked_prediction.detach() > 0)
    assert bool(language.global_alignment.detach() > 0)
    encoder = namespace["model"].tokenizer.encoder
    assert encoder.weight.grad is not None  # the language losses reached the tokenizer
    assert "global_alignment" in capsys.readouterr().out
