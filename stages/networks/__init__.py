"""Everything that builds or loads a network: the source's `net`, `cnn` and `resnet9` (small),
EfficientNet-Lite0 and torchvision's ImageNet backbones (architectures), pretrained weights
(weights), freezing (freeze), the multi-task heads (tasks), the model as params.model names it
(model), and inference on whole splits (predict)."""
