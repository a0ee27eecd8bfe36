"""Data: readers, datasets (VOC-layout segmentation, the built-in scenes and digits, image folders), transforms,
samplers and loaders."""
