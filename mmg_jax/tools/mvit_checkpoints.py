"""MViT-B checkpoint layouts (torchvision, pytorchvideo/SlowFast) and position-embedding adaptation.

Work in progress by helper "mvit": LAYOUTS and adapt_to_config are filled in next.
"""

LAYOUTS = ()


def adapt_to_config(params, encoder_config):
  """params with position embeddings resized to `encoder_config`'s token grid."""
  del encoder_config
  return params
