"""Vectorized rendering of synthetic MMG clips; the generative story is in mmg_synthetic.py.

`make_world(seed)` draws the fixed random parts (class causes and the per-modality renderer
weights), `render(world, causes, rng, ...)` turns a batch of per-clip causes into time-aligned
video, audio and IMU arrays. Time is measured in clip units, t in [0, 1), so that every
resolution shows the same content.
"""
import numpy as np

from data_pipeline import features, preprocess

LATENT_DIM = 8
# Within-class variation of a clip's cause, shared by its three modalities.
INSTANCE_STD = 0.35
# Private noise on each modality's view of the cause: it sets the informativeness ordering.
VIEW_NOISE_STD = {'video': 0.35, 'audio': 0.6, 'imu': 1.0}
# Renderer parameters read from the cause by each modality (beyond the shared tempo/direction).
NUM_VIEW_PARAMS = {'video': 8, 'audio': 4, 'imu': 3}
ACTOR_DIM = 4
GRAVITY = 9.81
# IMU channel moments of seed 0's base classes: the IMU is standardized with them, as the Ego4D
# builder standardizes with train-split moments.
IMU_MEAN = (0.0, 9.64, 0.0, 0.0, 0.0, 0.0)
IMU_STD = (1.46, 1.44, 2.34, 0.61, 0.59, 0.62)


def make_world(seed):
  """Class causes [NUM_CLASSES, LATENT_DIM] and fixed unit-norm renderer weights."""
  rng = np.random.default_rng([seed, 0])

  def unit_rows(num_rows):
    w = rng.normal(size=(num_rows, LATENT_DIM))
    return w / np.linalg.norm(w, axis=1, keepdims=True)

  return {
      'causes': rng.normal(size=(features.NUM_CLASSES, LATENT_DIM)),
      'tempo': unit_rows(1)[0],
      'direction': unit_rows(3),
      'background': rng.normal(size=(3, ACTOR_DIM)) / np.sqrt(ACTOR_DIM),
      **{m: unit_rows(n) for m, n in NUM_VIEW_PARAMS.items()},
  }


def sample_nuisance(rng, num_clips):
  """Per-clip nuisance shared by the three modalities of a clip."""
  return {
      'instance': rng.normal(size=(num_clips, LATENT_DIM)),
      'speed': np.exp(rng.uniform(-0.25, 0.25, num_clips)),
      'phase': rng.uniform(0.0, 1.0, num_clips),
      'actor': rng.normal(size=(num_clips, ACTOR_DIM)),
      'noise_level': np.exp(rng.uniform(-0.5, 0.5, num_clips)),
      'position': rng.uniform(0.35, 0.65, (num_clips, 2)),
      'yaw': rng.uniform(-1.0, 1.0, num_clips),  # head (camera and IMU) orientation, radians
  }


def render(world, causes, rng, *, video_shape, audio_shape, imu_shape):
  """Renders clips with the given causes [N, LATENT_DIM] -> dict of video/audio/imu [N, ...]."""
  num_clips = len(causes)
  nuisance = sample_nuisance(rng, num_clips)
  latent = causes + INSTANCE_STD * nuisance['instance']
  views = {m: latent @ world[m].T + VIEW_NOISE_STD[m] * rng.normal(size=(num_clips, n))
           for m, n in NUM_VIEW_PARAMS.items()}
  tempo = 2.0 * np.exp(0.35 * latent @ world['tempo']) * nuisance['speed']
  direction = latent @ world['direction'].T
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  motion = {'tempo': tempo, 'phase': nuisance['phase'],
            'direction': head_frame(direction, nuisance['yaw'])}
  return {
      'video': render_video(views['video'], motion, nuisance, world, rng, video_shape),
      'audio': render_audio(views['audio'], motion, nuisance, rng, audio_shape),
      'imu': render_imu(views['imu'], motion, nuisance, rng, imu_shape),
  }


def head_frame(vectors, yaw):
  """Rotates world vectors [N, 3] (x right, y up, z forward) into the head frame."""
  cos, sin = np.cos(yaw), np.sin(yaw)
  x, y, z = vectors.T
  return np.stack([cos * x + sin * z, y, cos * z - sin * x], axis=-1)


def cycle(motion, num_steps):
  """Fraction of the current motion cycle [N, num_steps] at the centres of `num_steps` steps."""
  t = (np.arange(num_steps) + 0.5) / num_steps
  return np.mod(motion['tempo'][:, None] * t + motion['phase'][:, None], 1.0)


def render_video(params, motion, nuisance, world, rng, shape):
  """A two-colour soft ellipse swinging along the motion direction over an actor background.

  Core and rim colours, size and elongation come from the cause; the ellipse is elongated
  along its motion direction in the image.
  """
  num_frames, height, width, _ = shape
  f32 = np.float32
  core = 1.0 / (1.0 + np.exp(-1.5 * params[:, :3]))
  rim = 1.0 / (1.0 + np.exp(-1.5 * params[:, 3:6]))
  radius = 0.2 + 0.06 * np.tanh(params[:, 6])
  elongation = np.exp(0.4 * np.tanh(params[:, 7]))
  image_direction = motion['direction'][:, :2] * np.array([1.0, -1.0])  # image y points down
  angle = np.arctan2(image_direction[:, 1], image_direction[:, 0])
  phase = 2 * np.pi * cycle(motion, num_frames)  # [N, T]
  swing = 0.18 * np.cos(phase)[..., None] * image_direction[:, None, :]
  centre = nuisance['position'][:, None, :] + swing  # [N, T, 2] as (x, y)
  x = (np.arange(width) + 0.5) / width
  y = (np.arange(height) + 0.5) / height
  dx = (x - centre[..., 0, None])[:, :, None, :]  # [N, T, 1, W]
  dy = (y - centre[..., 1, None])[:, :, :, None]  # [N, T, H, 1]
  # Squared ellipse distance as a quadratic form a dx^2 + b dy^2 + c dx dy.
  cos, sin = np.cos(angle), np.sin(angle)
  major, minor = (radius * elongation) ** -2, (radius / elongation) ** -2
  a = (major * cos**2 + minor * sin**2)[:, None, None, None]
  b = (major * sin**2 + minor * cos**2)[:, None, None, None]
  c = (2 * (major - minor) * sin * cos)[:, None, None, None]
  dist2 = (a * dx**2).astype(f32) + (b * dy**2).astype(f32) + (c * dx).astype(f32) * dy.astype(f32)
  inside = np.clip(2.0 - 1.5 * dist2, 0.0, 1.0)  # soft edge, [N, T, H, W]
  in_core = np.clip(2.0 - 6.0 * dist2, 0.0, 1.0)  # the inner half of the radius
  actor = nuisance['actor']
  lighting = np.exp(0.15 * np.tanh(actor[:, 0]))
  background = lighting[:, None] * (0.45 + 0.15 * np.tanh(actor @ world['background'].T))
  shade = 1.0 + 0.25 * np.tanh(actor[:, 1])[:, None] * (y - 0.5)  # [N, H]
  background = background[:, :, None, None, None] * shade[:, None, None, :, None]  # [N,3,1,H,1]
  core, rim = (lighting[:, None, None, None, None] * colour[:, :, None, None, None]
               for colour in (core, rim))
  # Channels first while rendering: numpy is slow on a trailing axis of size 3.
  frames = inside[:, None] * (rim - background).astype(f32)
  frames += in_core[:, None] * (core - rim).astype(f32)
  frames += background.astype(f32)
  frames += uniform_noise(rng, frames.shape, 0.05 * nuisance['noise_level'])
  frames *= 255.0
  frames += 0.5  # round to nearest below
  frames = np.clip(frames, 0, 255, out=frames).astype(np.uint8)
  return np.ascontiguousarray(frames.transpose(0, 2, 3, 4, 1))


def render_audio(params, motion, nuisance, rng, shape):
  """Log-mel of a decaying harmonic stack struck once per motion cycle, AST-normalized."""
  num_frames, num_bins = shape
  actor = nuisance['actor']
  f0 = 0.14 + 0.07 * np.tanh(params[:, 0]) + 0.03 * np.tanh(actor[:, 2])
  spacing = 0.2 + 0.07 * np.tanh(params[:, 1])
  tilt = 0.8 + 0.5 * np.tanh(params[:, 2])
  decay = 0.07 * np.exp(0.6 * np.tanh(params[:, 3]))
  harmonics = np.arange(4)
  centres = f0[:, None] + spacing[:, None] * harmonics  # [N, J]
  freq = (np.arange(num_bins) + 0.5) / num_bins
  bumps = np.exp(-0.5 * ((freq[None, None, :] - centres[..., None]) / 0.035) ** 2)
  spectrum = np.einsum('nj,njf->nf', np.exp(-tilt[:, None] * harmonics), bumps)
  spectrum *= np.exp(2.0 + 0.3 * np.tanh(actor[:, 0]))[:, None]  # loudness
  since_onset = cycle(motion, num_frames) / motion['tempo'][:, None]  # clip units
  envelope = np.exp(-since_onset / decay[:, None])  # [N, T_a]
  power = envelope.astype(np.float32)[..., None] * spectrum.astype(np.float32)[:, None, :]
  power += (0.02 * np.exp(-2.0 * freq) + 1e-6).astype(np.float32)  # noise floor
  log_mel = np.log(power, out=power)
  log_mel += uniform_noise(rng, log_mel.shape, 0.5 * nuisance['noise_level'])
  log_mel -= preprocess.AST_MEAN
  log_mel *= 1 / (2 * preprocess.AST_STD)
  return log_mel


def render_imu(params, motion, nuisance, rng, shape):
  """Accelerometer (gravity, swing along the motion direction, impacts), gyroscope; standardized."""
  length, _ = shape
  n = len(params)
  phase = cycle(motion, length)
  swing = 2.0 * np.exp(0.3 * np.tanh(params[:, 0]))[:, None] * np.sin(2 * np.pi * phase)
  impact = np.exp(-phase / 0.03 / motion['tempo'][:, None])
  accel = (swing + 3.0 * impact)[..., None] * motion['direction'][:, None, :]
  pitch = 0.3 * np.tanh(nuisance['actor'][:, 3])  # looking down, radians
  gravity = GRAVITY * np.stack([np.zeros(n), np.cos(pitch), np.sin(pitch)], axis=-1)
  accel += gravity[:, None, :]
  rates = np.tanh(np.stack([params[:, 1], params[:, 2], params[:, 1] - params[:, 2]], axis=-1))
  rates = head_frame(rates, nuisance['yaw'])  # rad/s
  gyro = rates[:, None, :] * np.cos(2 * np.pi * phase)[..., None]
  imu = np.concatenate([accel, gyro], axis=-1).astype(np.float32)
  noise_level = nuisance['noise_level']
  imu[..., :3] += uniform_noise(rng, (n, length, 3), 1.0 * noise_level)
  imu[..., 3:] += uniform_noise(rng, (n, length, 3), 0.3 * noise_level)
  imu -= np.float32(IMU_MEAN)
  imu /= np.float32(IMU_STD)
  return imu


def uniform_noise(rng, shape, std):
  """Float32 uniform noise with a per-clip `std` [N]; random bytes are much cheaper than normals."""
  size = int(np.prod(shape))
  noise = rng.integers(0, 2**32, size=-(-size // 4), dtype=np.uint32).view(np.uint8)[:size]
  noise = noise.reshape(shape).astype(np.float32) - np.float32(127.5)
  scale = (std * np.sqrt(12.0) / 256.0).astype(np.float32)
  return noise * scale.reshape((-1,) + (1,) * (len(shape) - 1))
