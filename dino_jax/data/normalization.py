"""ImageNet normalisation (torchvision's `Normalize(mean, std)` in every reference transform).

Its own TensorFlow-free module because both kinds of transform use it: the tf.data ops in `augment` and the
PIL/numpy readers of the evaluation protocols, which should not have to import TensorFlow.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
