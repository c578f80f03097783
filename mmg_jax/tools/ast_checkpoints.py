"""AST checkpoint layouts (AST repository, transformers 4 and 5) and position-embedding adaptation.

Work in progress by helper "ast": LAYOUTS and adapt_to_config are filled in next.
"""

LAYOUTS = ()


def adapt_to_config(params, encoder_config):
  """params with position embeddings resized to `encoder_config`'s number of frames."""
  del encoder_config
  return params
