"""Everything that builds or loads a network: one entry per network (registry), read by the rest;
the definitions: the source's `net`, `cnn` and `resnet9` (small), EfficientNet-Lite0
(efficientnet_lite), torchvision's ImageNet backbones (torchvision_models), timm's model zoo
(timm_models); pretrained weights (weights), freezing (freeze), the frozen prefix's cache
(feature_cache), the multi-task heads (tasks), the model as params.model names it (build), and
inference on whole splits (predict)."""
