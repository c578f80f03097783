"""Every preprocessing constant, and the functions that turn raw media into model inputs.

Video frames reach the model as uint8; the model normalizes them on device with VIDEO_MEAN and
VIDEO_STD (uint8 batches are 4x cheaper to move). Audio reaches it as AST-normalized log-mel.
"""

CLIP_SECONDS = 5.0

# Video: MViT-B 16x4 (torchvision mvit_v1_b Kinetics-400 transforms).
VIDEO_FPS = 30
VIDEO_NUM_FRAMES = 16
VIDEO_FRAME_STRIDE = 4
VIDEO_RESIZE_SHORT_SIDE = 256
VIDEO_CROP_SIZE = 224
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)

# Audio: AST input, a Kaldi log-mel filterbank of 16 kHz mono audio.
AUDIO_SAMPLE_RATE = 16_000
AUDIO_NUM_MEL_BINS = 128
AUDIO_FRAME_LENGTH_MS = 25.0
AUDIO_FRAME_SHIFT_MS = 10.0
AST_MEAN = -4.2677393
AST_STD = 4.5689974

# IMU: accelerometer xyz then gyroscope xyz on a uniform grid.
IMU_RATE_HZ = 200
IMU_CHANNELS = ('accl_x', 'accl_y', 'accl_z', 'gyro_x', 'gyro_y', 'gyro_z')
