"""The paper's published numbers (MMG-Ego4D, CVPR 2023, its tables): the one place the
experiment configs (which turn them into evaluation rows), the report and the plots read them.

Accuracies in percent; modality subsets as tuples of names (data_pipeline.modalities).
"""
from data_pipeline import modalities

_NAMES = {short: name for name, short in modalities.SHORT.items()}


def _subset(short):
  """'VAI' -> ('video', 'audio', 'imu')."""
  return modalities.check(_NAMES[c] for c in short)


def _table(rows):
  return tuple({'setting': setting, 'train': _subset(train), 'test': _subset(test),
                'paper': paper} for setting, train, test, paper in rows)


# Few-shot: 5-way 5-shot accuracy on the novel classes, support -> query modalities.
FEWSHOT = _table([
    ('regular', 'VAI', 'VAI', 63.00),
    ('missing', 'VAI', 'VA', 61.76),
    ('missing', 'VAI', 'AI', 50.77),
    ('missing', 'VAI', 'VI', 62.79),
    ('missing', 'VAI', 'V', 62.68),
    ('missing', 'VAI', 'A', 43.65),
    ('missing', 'VAI', 'I', 47.48),
    ('zero-shot', 'A', 'V', 46.90),
    ('zero-shot', 'I', 'V', 42.07),
    ('zero-shot', 'AI', 'V', 50.80),
    ('zero-shot', 'V', 'A', 44.01),
    ('zero-shot', 'V', 'I', 46.56),
    ('zero-shot', 'V', 'AI', 49.37),
])

# Many-shot: top-1 on the test split, train -> test modalities.
MANYSHOT = _table([
    ('regular', 'VAI', 'VAI', 55.66),
    ('missing', 'VAI', 'VA', 55.47),
    ('missing', 'VAI', 'AI', 37.07),
    ('missing', 'VAI', 'VI', 54.57),
    ('zero-shot', 'A', 'V', 30.98),
    ('zero-shot', 'I', 'V', 20.00),
    ('zero-shot', 'AI', 'V', 25.03),
    ('zero-shot', 'V', 'A', 43.43),
    ('zero-shot', 'V', 'I', 35.67),
    ('zero-shot', 'V', 'AI', 41.02),
])

# Ablation: one cell per (setting, variant); None where the paper prints '-'. The few-shot
# zero-shot cell trains on A I (support) and tests on V (query), as the many-shot one.
ABLATION_SETTINGS = (
    {'setting': 'regular', 'train': _subset('VAI'), 'test': _subset('VAI')},
    {'setting': 'missing', 'train': _subset('VAI'), 'test': _subset('AI')},
    {'setting': 'zero-shot', 'train': _subset('AI'), 'test': _subset('V')},
)
ABLATION_VARIANTS = (
    {'fusion': 'attention', 'alignment': True, 'proto_loss': True},
    {'fusion': 'attention', 'alignment': False, 'proto_loss': True},
    {'fusion': 'mlp', 'alignment': True, 'proto_loss': True},
    {'fusion': 'attention', 'alignment': True, 'proto_loss': False},
)
# paper[setting][variant] = (top1, 5w5s_acc), settings and variants in the orders above.
ABLATION = (
    ((55.66, 63.00), (52.18, 61.16), (52.79, 58.67), (None, 62.37)),
    ((37.07, 50.77), (21.32, 40.87), (32.89, 49.00), (None, 50.03)),
    ((25.03, 51.40), (2.37, 33.93), (24.54, 51.08), (None, 50.80)),
)
# Unimodal baselines (the paper's models table): top-1 of MViT-B, AST and the IMU transformer.
UNIMODAL_TOP1 = {'video': 52.40, 'audio': 39.48, 'imu': 29.78}
# Few-shot unimodal baselines (the paper's few-shot table): 5-way 5-shot on the novel classes.
UNIMODAL_FEWSHOT = {'video': 58.89, 'audio': 31.06, 'imu': 40.07}
# Memory per second of each modality's data (the paper's cost figure), KB/s.
MEMORY_KB_PER_SEC = {'video': 593.92, 'audio': 62.76, 'imu': 9.44}
# The paper's encoders (its models table): (params M, GFLOPs) of one clip.
ENCODER_COSTS = {'video': (36.50, 70.50), 'audio': (87.03, 42.08), 'imu': (15.55, 1.65)}
# What the paper's tables report under each of our metric names.
METRIC_NAMES = {'top1': 'top-1', '5w5s_acc': '5-way 5-shot'}
