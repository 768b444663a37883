"""What the web app and the CLI do with a model, minus their user interfaces.

`CodecService` wraps an exported model directory (`vqwavenet.codec.Codec`) with the checks a
service facing users needs: audio goes through `vqwavenet.audio.load_audio` (format, rate, channels,
NaN, duration limit), codes files through `vqwavenet.codes_file.CodesFile.read` (magic,
version, header, range) plus the checks only the model can make (same model, hop, rate,
codebook, frames consistent with the sample count, speaker known, duration limit). Every refusal
is an `InputError` (a ``ValueError``) whose message can be shown to the user as is.

Torch-free: numpy, onnxruntime, soundfile and soxr only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest, ModelDirError
from vqwavenet.audio import AudioError, load_audio
from vqwavenet.codes_file import SUFFIX, CodesFile, CodesFileError, ModelRef

DEFAULT_MODEL = BUNDLED_MODEL
DEFAULT_MAX_SECONDS = 60.0

Progress = Callable[[int, int], None]


class InputError(ValueError):
    """An input the service refuses; the message says why and can be shown as is."""


class ModelLoadError(RuntimeError):
    """The model directory cannot be used; the message says what to do."""


@dataclass
class Encoded:
    """The result of encoding one recording."""

    codes: CodesFile
    wave: np.ndarray  # [n] float32 at the model's rate, as encoded


class CodecService:
    """A loaded model plus the limits of one deployment.

    Args:
        model_dir: an exported model directory (``python -m export``).
        max_seconds: longest accepted audio, and longest audio a codes file may decode to
            (``None``: no limit, for the CLI; the web app keeps one).
        workers: generation threads of the engine (default: its own choice).
        int8: decode with the int8 graphs (``python -m export --int8``; faster in large
            batches, slightly less exact).
        max_rows: rows each of the decoder's workers runs at once (default: the engine's);
            a machine with more cores than these runs more rows per step batch.
        playback_rows: segments one playback stream decodes at once (default: the codec's).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike = DEFAULT_MODEL,
        *,
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
        workers: int | None = None,
        int8: bool = False,
        max_rows: int | None = None,
        playback_rows: int | None = None,
    ):
        if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds}")
        for name, rows in (("max_rows", max_rows), ("playback_rows", playback_rows)):
            if rows is not None and rows < 1:
                raise ValueError(f"{name} must be >= 1, got {rows}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model.json").is_file():
            raise ModelLoadError(
                f"no model at {self.model_dir} (no model.json): export a checkpoint with "
                f"`python -m export --checkpoint CKPT --out {self.model_dir}` or pass --model DIR"
            )
        try:
            self.codec = Codec(self.model_dir, workers=workers, int8=int8)
        except (ModelDirError, KeyError, ValueError, OSError) as e:
            raise ModelLoadError(f"cannot load the model in {self.model_dir}: {e}") from e
        except Exception as e:  # onnxruntime raises its own exception types on a bad graph
            raise ModelLoadError(f"cannot load the model in {self.model_dir}: {e}") from e
        if max_rows is not None:
            self.codec.max_rows = max_rows
        if playback_rows is not None:
            self.codec.playback_rows = playback_rows
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.model_ref = ModelRef(self.codec.model_id, self.codec.codes_hash)

    # --- facts about the model ----------------------------------------------------------------

    @property
    def speakers(self) -> list[str]:
        return list(self.codec.speakers)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> float:
        """Codes per second."""
        return self.codec.sample_rate / self.codec.hop

    @property
    def bits_per_code(self) -> float:
        return math.log2(self.codec.codebook_size)

    @property
    def bitrate(self) -> float:
        """Bits per second of the code sequence (frame rate x log2 K), headers excluded."""
        return self.frame_rate * self.bits_per_code

    @property
    def notice(self) -> str | None:
        """A caveat the model's maker wants users to see (``model.json``'s "notice")."""
        notice = self.codec.meta.get("notice")
        return str(notice) if notice else None

    def speaker_index(self, speaker: int | str | None, default: int = 0) -> int:
        """Index of a speaker given by name, index or index as text (``None``: ``default``)."""
        if speaker is None or (isinstance(speaker, str) and not speaker.strip()):
            return default
        if isinstance(speaker, str):
            speaker = speaker.strip()
            if speaker in self.speakers:
                return self.speakers.index(speaker)
            if not speaker.lstrip("-").isdigit():
                raise InputError(
                    f"unknown speaker {speaker!r}: this model knows {', '.join(self.speakers)} "
                    f"(or an index 0..{len(self.speakers) - 1})"
                )
            speaker = int(speaker)
        if isinstance(speaker, bool) or not isinstance(speaker, int | np.integer):
            raise InputError(f"a speaker is a name or an index, got {speaker!r}")
        if not 0 <= speaker < len(self.speakers):
            raise InputError(
                f"speaker index {speaker} out of range: this model has {len(self.speakers)} "
                f"speakers (0..{len(self.speakers) - 1}: {', '.join(self.speakers)})"
            )
        return int(speaker)

    # --- audio --------------------------------------------------------------------------------

    def load_audio(self, source) -> np.ndarray:
        """Any supported audio (path, bytes, file object, ``(sr, array)``) -> ``[n]`` float32
        at the model's rate; `InputError` for anything unusable or over the duration limit."""
        if source is None:
            raise InputError("no audio given: upload or record a recording first")
        try:
            return load_audio(source, self.sample_rate, max_seconds=self.max_seconds)
        except AudioError as e:
            raise InputError(str(e)) from None

    def encode(self, source, speaker: int | str | None = None) -> Encoded:
        """Encode a recording; ``speaker`` is stored in the file as the default voice."""
        index = self.speaker_index(speaker)
        wave = self.load_audio(source)
        codes = self.codec.encode(wave)
        cf = CodesFile(
            codes,
            model_id=self.model_ref.model_id,
            model_hash=self.model_ref.model_hash,
            sample_rate=self.sample_rate,
            hop=self.codec.hop,
            codebook_size=self.codec.codebook_size,
            speaker_name=self.speakers[index],
            speaker_index=index,
            num_samples=len(wave),
        )
        return Encoded(cf, wave)

    # --- codes --------------------------------------------------------------------------------

    def read_codes(self, source) -> CodesFile:
        """Read and validate a codes file (path, bytes or file object) for this model."""
        if source is None:
            raise InputError("no codes file given: upload a .vqwc file made by Encode")
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                cf = CodesFile.from_bytes(source, expected_model=self.model_ref)
            else:
                cf = CodesFile.read(source, expected_model=self.model_ref)
        except CodesFileError as e:
            raise InputError(str(e)) from None
        self.check_codes(cf)
        return cf

    def check_codes(self, cf: CodesFile) -> None:
        """The checks only the model can make; `InputError` names the first that fails."""
        c = self.codec
        for what, got, want in (
            ("sample rate", cf.sample_rate, c.sample_rate),
            ("hop", cf.hop, c.hop),
            ("codebook size", cf.codebook_size, c.codebook_size),
        ):
            if got != want:
                raise InputError(f"codes file {what} is {got}, this model's is {want}")
        if self.max_seconds is not None and cf.duration > self.max_seconds:
            raise InputError(
                f"codes file decodes to {cf.duration:.1f} s of audio, over the "
                f"{self.max_seconds:g} s limit"
            )
        frames = c.geometry.padding(cf.num_samples)[2]
        if frames != cf.num_frames:
            raise InputError(
                f"codes file is inconsistent: {cf.num_samples} samples need {frames} frames, "
                f"the file holds {cf.num_frames}"
            )
        if cf.speaker_index >= len(self.speakers):
            raise InputError(
                f"codes file names speaker {cf.speaker_name!r} (index {cf.speaker_index}), "
                f"but this model has {len(self.speakers)} speakers"
            )

    def request(
        self, cf: CodesFile, speaker: int | str | None = None, seed: int = 0
    ) -> DecodeRequest:
        """The engine's request for decoding ``cf`` after every check (``speaker=None``: the
        file's); raises `InputError`."""
        self.check_codes(cf)
        index = self.speaker_index(speaker, default=cf.speaker_index)
        codes = np.asarray(cf.codes, dtype=np.int64)
        return DecodeRequest(codes, index, cf.num_samples, _check_seed(seed))

    def decode(
        self,
        cf: CodesFile,
        speaker: int | str | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """``[num_samples]`` float32 at the model's rate; ``speaker=None``: the file's."""
        return self.decode_many([self.request(cf, speaker, seed)], progress)[0]

    def decode_many(
        self, requests: list[DecodeRequest], progress: Progress | None = None
    ) -> list[np.ndarray]:
        """Several checked requests (`request`) as one batch: the engine fills its rows with
        segments of every file, several times faster than one file at a time."""
        return self.codec.decode_many(requests, progress=progress)

    def decode_stream(
        self,
        cf: CodesFile,
        speaker: int | str | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> Iterator[np.ndarray]:
        """`decode` in consecutive float32 chunks for a player: the engine's playback schedule
        (`Codec.decode_stream`), in the step batches the engine shares between all requests;
        the first chunk comes once a player can start on it and play to the end without a
        gap, the later ones while the earlier ones play. The chunks concatenate to exactly
        `decode`'s output for the same arguments, whatever runs beside them (in int8 with a
        model whose int8 step scales activations per row, `Codec.rows_independent`).

        The checks run here, at the call, not at the first ``next()``: a refusal is raised
        before any audio exists (a failure of the engine itself, or `vqwavenet.Busy` when it
        holds all the requests it takes, still comes from the iterator).
        """
        req = self.request(cf, speaker, seed)
        return self.codec.decode_stream(
            req.codes, req.speaker, req.seed, progress, n_samples=req.n_samples
        )

    def resynthesize(
        self,
        source,
        speaker: int | str | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> tuple[Encoded, np.ndarray]:
        """Encode then decode in ``speaker``'s voice (voice conversion); returns the encoding
        (with the loaded original) and the resynthesised ``[n]`` float32."""
        enc = self.encode(source, speaker)
        return enc, self.decode(enc.codes, speaker, seed, progress)


def _check_seed(seed) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"the seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


def codes_name(source_name: str) -> str:
    """File name of the codes of a recording called ``source_name``."""
    return Path(source_name).stem + SUFFIX
