"""Sources of instances, backbones, and the GPU extraction loop."""
