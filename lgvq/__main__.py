"""`python -m lgvq` / `lgvq`: command-line entry (verbs: train, eval)."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("lgvq: the train and eval verbs are not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
