"""vqwavenet: a batch-invariant VQ-VAE WaveNet speech codec that runs on onnxruntime (no torch).

    from vqwavenet import BUNDLED_MODEL, Codec, load_audio

    codec = Codec(BUNDLED_MODEL)
    wave = load_audio("speech.wav", codec.sample_rate)
    codes = codec.encode(wave)                              # [F] int64, 50 Hz
    audio = codec.decode(codes, speaker="Carlo", seed=1)    # float32 at codec.sample_rate

The public API: `Codec` and `DecodeRequest` (`vqwavenet.codec`), `Busy` (a decode refused
because the engine holds all the requests it takes, `vqwavenet.steps`), audio in and out
(`vqwavenet.audio`), the codes file (`vqwavenet.codes_file`) and the model directory
(`vqwavenet.model_dir`). The ``vqwavenet`` command is `vqwavenet.__main__`.
"""

from vqwavenet.audio import AudioError, load_audio, save_wav
from vqwavenet.codec import Codec, DecodeRequest
from vqwavenet.codes_file import CodesFile, CodesFileError
from vqwavenet.model_dir import BUNDLED_MODEL, ModelDirError
from vqwavenet.steps import Busy

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODEL",
    "AudioError",
    "Busy",
    "Codec",
    "CodesFile",
    "CodesFileError",
    "DecodeRequest",
    "ModelDirError",
    "__version__",
    "load_audio",
    "save_wav",
]
