"""The pipeline's stages (download, augment, train, evaluate) and the modules they share."""
