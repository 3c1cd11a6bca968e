"""Data: the built-in captioned-shapes set, real captioned-image folders, batching helpers.

Every data set yields {"image": float32 [3, H, W] in [-1, 1], "captions": list[str],
"attributes": SceneAttributes (shapes) or None, "index": int}. Batch with
``collate_captioned_images``; draw the step's caption per image with
``draw_one_caption_per_image``.
"""

from lgvq.data.build import DATASET_NAMES, build_dataset, dataset_captions
from lgvq.data.collate import (collate_captioned_images, draw_captions_per_image,
                                draw_one_caption_per_image)
from lgvq.data.folders import (
    CaptionedImageFolderDataset,
    CelebAHQCaptionsDataset,
    CocoCaptionsDataset,
    CubCaptionsDataset,
    JsonlManifestDataset,
    load_image_tensor,
)
from lgvq.data.shapes import (
    ALL_ATTRIBUTE_WORDS,
    ATTRIBUTE_WORDS,
    CAPTION_TEMPLATE_COUNT,
    COLOUR_NAMES,
    REGION_NAMES,
    RELATION_NAMES,
    SHAPE_NAMES,
    SIZE_NAMES,
    SceneAttributes,
    ShapeObject,
    ShapesDataset,
    SpatialRelation,
    caption_for,
    caption_vocabulary,
    caption_words,
    find_attribute_words,
    generate_captioned_scene,
    render_scene,
    sample_scene,
)

__all__ = [
    "dataset_captions",
    "ALL_ATTRIBUTE_WORDS",
    "ATTRIBUTE_WORDS",
    "CAPTION_TEMPLATE_COUNT",
    "COLOUR_NAMES",
    "DATASET_NAMES",
    "REGION_NAMES",
    "RELATION_NAMES",
    "SHAPE_NAMES",
    "SIZE_NAMES",
    "CaptionedImageFolderDataset",
    "CelebAHQCaptionsDataset",
    "CocoCaptionsDataset",
    "CubCaptionsDataset",
    "JsonlManifestDataset",
    "SceneAttributes",
    "ShapeObject",
    "ShapesDataset",
    "SpatialRelation",
    "build_dataset",
    "caption_for",
    "caption_vocabulary",
    "caption_words",
    "collate_captioned_images",
    "draw_captions_per_image",
    "draw_one_caption_per_image",
    "find_attribute_words",
    "generate_captioned_scene",
    "load_image_tensor",
    "render_scene",
    "sample_scene",
]
