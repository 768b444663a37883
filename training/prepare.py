"""Prepare a corpus for training: decode, mix to mono, resample, split, fix feature statistics.

    python -m training.prepare --corpus asterisk fillets --hold-out June --out data/speech
    python -m training.prepare --corpus asterisk --out data/asterisk
    python -m training.prepare --corpus folder --root /data/LibriSpeech --out data/libri

``asterisk`` installs the Debian G.722 prompt packages (en, es, fr, it, ru) when missing (with
English, also the package of its transcripts, for the evaluation's word error rates) and reads
them from /usr/share/asterisk/sounds; the speaker is the voice of the folder (es_MX_f_Allison and
en_US_f_Allison are one voice: 4 speakers in all). ``fillets`` installs the Debian package
fillets-ng-data-nl (Dutch acted dialogue of the game Fish Fillets, 22.05 kHz Ogg Vorbis; licence
in /usr/share/doc/fillets-ng-data-nl/copyright) and keeps its two main voices, the small fish
(``m`` in the file names) and the big fish (``v``); the minor characters' lines are left out.
Several corpora may be given at once. ``folder`` reads any tree of wav/flac files:
LibriSpeech (SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac) and VCTK (wav48*/pXXX/*.wav|flac) layouts
give the speaker from the path, anything else the parent folder's name.

The output is the layout of `training.dataset` (16 kHz mono int16 audio, index.json, stats.json).
``--hold-out NAME`` writes every utterance of that speaker to ``OUT/heldout`` instead, a dataset
of the same layout that training never reads, so evaluation can report a voice the model never
heard (`training.evaluate`).
Bad files (unreadable, empty, NaN/Inf samples) are skipped and listed with their reason. The
dataset is written into ``OUT.tmp-XXXX`` beside OUT and renamed into place only when complete.
Feature statistics (mean/std over every feature frame of the train split) are computed with the
model's own MFCC on each stored utterance, without the utterance padding: the trainer's own
fallback does the same, and the zero padding (-100 dB frames, 13% of the frames of the Asterisk
prompts) would double the std of c0. ``--stats-on padded`` counts every frame the encoder sees,
padding included (`CodecGeometry.padding`); stats.json says which was used.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from model.autoencoder import Autoencoder
from training.config import load_model_config, resolve_path
from training.dataset import SPLITS, DatasetWriter, split_of
from training.transcripts import PACKAGE as TRANSCRIPTS_PACKAGE

ASTERISK_ROOT = Path("/usr/share/asterisk/sounds")
ASTERISK_LANGUAGES = ("en", "es", "fr", "it", "ru")
# Voice folders are LANG_REGION_GENDER_NAME (en_US_f_Allison); `en`, `en_US` are symlinks to them.
VOICE_FOLDER = re.compile(
    r"^(?P<lang>[a-z]{2})_(?P<region>[A-Z]{2})_(?P<gender>[fm])_(?P<name>\w+)$"
)
AUDIO_SUFFIXES = (".wav", ".flac")
FILLETS_ROOT = Path("/usr/share/games/fillets-ng/sound")
FILLETS_PACKAGE = "fillets-ng-data-nl"
# File names are LEVELPREFIX-SPEAKER-WORD.ogg; the two fish speak most lines.
FILLETS_VOICES = {"m": "SmallFish", "v": "BigFish"}
HELDOUT = "heldout"
LIBRISPEECH_STEM = re.compile(r"^(\d+)-(\d+)-\d+$")
VCTK_SPEAKER = re.compile(r"^[ps]\d+$")


class BadFile(Exception):
    """A file that cannot become an utterance; the message is the reason listed in the index."""


@dataclass(frozen=True)
class Source:
    """One input file: its utterance id (stable, independent of where the corpus lives), the
    speaker name, the key its split is hashed from, and how to decode it."""

    path: Path
    id: str
    speaker: str
    split_key: str
    codec: str  # "g722" or "soundfile"


# --- Asterisk prompts -------------------------------------------------------------------------


def asterisk_packages(languages) -> list[str]:
    """The G.722 prompt packages of ``languages``; with English also ``asterisk-core-sounds-en``,
    whose transcripts `training.evaluate` scores word error rates against."""
    packages = [f"asterisk-core-sounds-{lang}-g722" for lang in languages]
    return packages + ([TRANSCRIPTS_PACKAGE] if "en" in languages else [])


def missing_packages(packages: list[str]) -> list[str]:
    """Debian packages of ``packages`` that dpkg does not report as installed."""
    if shutil.which("dpkg-query") is None:
        raise RuntimeError("dpkg-query not found: this is not a Debian system")
    missing = []
    for pkg in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if res.returncode != 0 or "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def install_packages(packages: list[str]) -> None:
    """``apt-get update`` then ``apt-get install`` (needs root)."""
    if os.geteuid() != 0:
        raise PermissionError(
            f"missing Debian packages {' '.join(packages)}: run as root, or install them with "
            f"`sudo apt-get install {' '.join(packages)}`"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        print("+", " ".join(cmd), file=sys.stderr)
        res = subprocess.run(cmd, env=env, stdout=sys.stderr)  # stdout is for the summary
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {res.returncode}")


def asterisk_sources(sounds_root: Path, languages) -> list[Source]:
    """G.722 prompts of the voice folders of ``languages``; the speaker is the voice's name.

    Only real directories are read: the ``en``/``en_US`` symlinks point at a voice folder and
    would count its files twice. Spanish (es_MX_f_Allison) is the English voice, Allison.
    """
    sources = []
    for folder in sorted(sounds_root.iterdir()):
        m = VOICE_FOLDER.match(folder.name)
        if m is None or folder.is_symlink() or not folder.is_dir():
            continue
        if m["lang"] not in languages:
            continue
        for path in sorted(folder.rglob("*.g722")):
            rel = path.relative_to(sounds_root).with_suffix("").as_posix()
            sources.append(Source(path, rel, m["name"], rel, "g722"))
    return sources


# --- Fish Fillets (Dutch) ------------------------------------------------------------------


def fillets_sources(sounds_root: Path, language: str = "nl") -> list[Source]:
    """The two fish's lines of one language: ``LEVEL/LANG/PREFIX-VOICE-WORD.ogg``, voice ``m``
    (the small fish) or ``v`` (the big fish); other characters' lines are not returned."""
    sources = []
    for path in sorted(sounds_root.glob(f"*/{language}/*.ogg")):
        fields = path.stem.split("-")
        voice = FILLETS_VOICES.get(fields[1]) if len(fields) >= 3 else None
        if voice is None:
            continue
        rel = f"fillets/{path.relative_to(sounds_root).with_suffix('').as_posix()}"
        sources.append(Source(path, rel, voice, rel, "soundfile"))
    return sources


# --- Any folder of wav/flac -------------------------------------------------------------------


def folder_source(root: Path, path: Path) -> Source:
    """Speaker and id from the path: LibriSpeech and VCTK layouts, else the parent folder."""
    parts = path.relative_to(root).parts
    stem = path.stem
    m = LIBRISPEECH_STEM.match(stem)
    if m and len(parts) >= 3 and parts[-3] == m[1] and parts[-2] == m[2]:
        return Source(path, f"{m[1]}/{stem}", m[1], f"{m[1]}/{stem}", "soundfile")
    if (
        len(parts) >= 3
        and parts[-3].startswith("wav48")
        and VCTK_SPEAKER.match(parts[-2])
        and stem.startswith(parts[-2] + "_")
    ):
        # Both microphones of one VCTK recording (_mic1, _mic2) fall into the same split.
        uid = f"{parts[-2]}/{stem}"
        return Source(path, uid, parts[-2], re.sub(r"_mic\d+$", "", uid), "soundfile")
    speaker = parts[-2] if len(parts) >= 2 else root.resolve().name
    uid = Path(*parts).with_suffix("").as_posix()
    return Source(path, uid, speaker, uid, "soundfile")


def folder_sources(root: Path) -> list[Source]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths += [Path(dirpath) / f for f in filenames if f.lower().endswith(AUDIO_SUFFIXES)]
    return [folder_source(root, p) for p in sorted(paths)]


# --- Decoding ---------------------------------------------------------------------------------


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float ``[n]`` in [-1, 1] -> int16 ``[n]`` (rounded, clipped; int16 input is exact)."""
    return np.clip(np.round(wave.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def read_g722(path: Path) -> np.ndarray:
    """A raw G.722 (64 kbit/s) file -> int16 ``[2 * bytes]`` at 16 kHz."""
    from G722 import G722

    data = path.read_bytes()
    if not data:
        raise BadFile("empty file (0 bytes)")
    return np.asarray(G722(16000, 64000).decode(data), dtype=np.int16)  # fresh decoder state


def read_soundfile(path: Path, sample_rate: int) -> np.ndarray:
    """Any libsndfile format -> mono int16 ``[n]`` at ``sample_rate`` (channel mean, resampled)."""
    if path.stat().st_size == 0:
        raise BadFile("empty file (0 bytes)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
    except Exception as e:  # libsndfile reports every format problem as one error type
        msg = str(e).strip().split("': ")[-1]  # drop libsndfile's "Error opening '<path>'"
        raise BadFile(f"unreadable: {msg}") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise BadFile("zero length (no samples)")
    if not np.isfinite(data).all():
        raise BadFile(f"non-finite samples (NaN/Inf): {int((~np.isfinite(data)).sum())}")
    mono = data.mean(axis=1)
    if sr != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), sr, sample_rate).numpy()
    if len(mono) == 0:
        raise BadFile(f"zero length after resampling {sr} Hz to {sample_rate} Hz")
    return to_int16(mono)


def read_source(src: Source, sample_rate: int) -> np.ndarray:
    if src.codec == "g722":
        if sample_rate != 16000:
            raise BadFile(f"G.722 is 16 kHz, the features expect {sample_rate} Hz")
        wave = read_g722(src.path)
    else:
        wave = read_soundfile(src.path, sample_rate)
    if len(wave) == 0:
        raise BadFile("zero length (no samples)")
    return wave


# --- Feature statistics -----------------------------------------------------------------------


class RunningStats:
    """Per-dimension mean and (population) std over feature frames, merged exactly in float64
    (Chan et al.'s pairwise update), so one pass over the corpus suffices."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def add(self, feats: np.ndarray) -> None:
        """``feats``: ``[D, M]`` frames of one utterance."""
        n = feats.shape[1]
        if n == 0:
            return
        mean = feats.mean(axis=1)
        m2 = ((feats - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


class FeatureStatistics:
    """The model's MFCC (unnormalised) on each utterance, optionally padded as in training."""

    def __init__(self, config: str, padded: bool = False):
        cfg = load_model_config(config)
        self.model = Autoencoder(cfg).eval()  # only its geometry and features are used
        self.features_config = asdict(cfg.features)
        self.config = config
        self.padded = padded
        self.train = RunningStats(self.model.features.dim)
        self.all = RunningStats(self.model.features.dim)
        self.too_short = 0

    @torch.inference_mode()
    def add(self, wave: np.ndarray, split: str) -> None:
        """``wave``: int16 ``[n]`` as stored (read back as ``x / 32768`` like `Dataset.wave`)."""
        x = torch.from_numpy(wave.astype(np.float32) / 32768.0)[None]  # [1, n]
        if self.padded:
            x, _, _ = self.model.pad(x)
        try:
            feats = self.model.features(x)[0].double().numpy()  # [D, M]
        except ValueError:  # shorter than one feature frame (only without padding)
            self.too_short += 1
            return
        self.all.add(feats)
        if split == "train":
            self.train.add(feats)

    def result(self) -> dict:
        stats, splits = (self.train, ["train"]) if self.train.count else (self.all, list(SPLITS))
        return {
            "features": self.features_config,
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
            "frames": stats.count,
            "splits": splits,
            "padded": self.padded,
            "config": self.config,
        }


# --- The run ----------------------------------------------------------------------------------


@dataclass
class Summary:
    samples: dict  # (speaker, split) -> samples
    skipped: list[dict]
    sample_rate: int
    stats: dict


def prepare(
    sources: list[Source],
    out: Path,
    config: str = "default",
    force: bool = False,
    padded: bool = False,
    limit: int | None = None,
    source_info: dict | None = None,
    progress: bool = True,
    hold_out: frozenset[str] = frozenset(),
) -> Summary:
    """Write the dataset of ``sources`` to ``out`` atomically; raises RuntimeError when no file
    was usable (nothing is written then) and FileExistsError when ``out`` exists without
    ``force``. Speakers in ``hold_out`` go to ``out/heldout`` (same layout, never trained on)
    and do not count in the feature statistics."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    stats = FeatureStatistics(config, padded)
    sample_rate = stats.features_config["sample_rate"]
    sources = sorted(sources, key=lambda s: (s.id, str(s.path)))  # order-independent output
    if limit is not None:
        sources = sources[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would follow the directory into place
    # One utterance at a time is too little work for several threads: on a shared machine
    # their synchronisation made the features 50x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        writer = DatasetWriter(tmp, sample_rate)
        held = None
        if hold_out:
            (tmp / HELDOUT).mkdir()
            held = DatasetWriter(tmp / HELDOUT, sample_rate)
        seen: dict[str, Path] = {}
        samples: dict = defaultdict(int)
        for src in tqdm(sources, desc="prepare", unit="file", disable=not progress):
            if src.id in seen:
                writer.skip(src.path, f"duplicate utterance id {src.id!r} (kept {seen[src.id]})")
                continue
            try:
                wave = read_source(src, sample_rate)
            except BadFile as e:
                writer.skip(src.path, str(e))
                continue
            except OSError as e:  # unreadable from the file system: still only this file
                writer.skip(src.path, f"unreadable: {e}")
                continue
            seen[src.id] = src.path
            split = split_of(src.split_key)
            if src.speaker in hold_out:
                held.add(src.id, src.speaker, wave, split)
                samples[(src.speaker, HELDOUT)] += len(wave)
                continue
            writer.add(src.id, src.speaker, wave, split)
            stats.add(wave, split)
            samples[(src.speaker, split)] += len(wave)
        if len(writer) == 0:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in writer.skipped[:5])
            raise RuntimeError(
                f"no usable audio among {len(sources)} file(s)"
                + (f" ({reasons})" if reasons else "")
            )
        missing = sorted(hold_out - {spk for spk, split in samples if split == HELDOUT})
        if missing:
            raise RuntimeError(f"--hold-out: no utterances of {', '.join(missing)}")
        summary = Summary(dict(samples), list(writer.skipped), sample_rate, stats.result())
        if held is not None:
            held.close(summary.stats, dict(source_info or {}, held_out=sorted(hold_out)))
        writer.close(summary.stats, source_info)
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} appeared while preparing: pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def print_summary(summary: Summary, out: Path, file=None) -> None:
    """Minutes per speaker and split, then the skipped files with their reasons."""
    file = file or sys.stdout
    minutes = {k: v / summary.sample_rate / 60 for k, v in summary.samples.items()}
    speakers = sorted({s for s, _ in minutes})
    print(f"wrote {out}", file=file)
    columns = (*SPLITS, HELDOUT)
    print(
        f"{'speaker':<20}" + "".join(f"{s:>10}" for s in (*columns, "total")) + "  (minutes)",
        file=file,
    )
    rows = [(spk, [minutes.get((spk, split), 0.0) for split in columns]) for spk in speakers]
    rows.append(("(all)", [sum(r[1][i] for r in rows) for i in range(len(columns))]))
    for name, row in rows:
        print(f"{name:<20}" + "".join(f"{m:>10.2f}" for m in (*row, sum(row))), file=file)
    st = summary.stats
    print(f"feature statistics: {st['frames']} frames of {'+'.join(st['splits'])}", file=file)
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} file(s):", file=file)
        for s in summary.skipped[:50]:
            print(f"  {s['path']}: {s['reason']}", file=file)
        if len(summary.skipped) > 50:
            print(
                f"  ... and {len(summary.skipped) - 50} more (all listed in index.json)", file=file
            )


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.prepare",
        description="Prepare a speech corpus (16 kHz mono int16 + index + feature statistics).",
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        choices=("asterisk", "fillets", "folder"),
        required=True,
        help="one or more corpora, merged into one dataset",
    )
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--root", help="folder corpus: the tree of wav/flac files")
    p.add_argument(
        "--languages",
        default=",".join(ASTERISK_LANGUAGES),
        help="asterisk: comma-separated languages (default: %(default)s)",
    )
    p.add_argument(
        "--sounds-root",
        default=str(ASTERISK_ROOT),
        help="asterisk: where the voice folders are (default: %(default)s)",
    )
    p.add_argument(
        "--fillets-root",
        default=str(FILLETS_ROOT),
        help="fillets: the game's sound folder (default: %(default)s)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="asterisk, fillets: never run apt-get, use what is there",
    )
    p.add_argument(
        "--hold-out",
        metavar="SPEAKERS",
        help="comma-separated speakers written to OUT/heldout instead (never trained on)",
    )
    p.add_argument("--config", default="default", help="model config for the features and padding")
    p.add_argument(
        "--stats-on",
        choices=("padded", "utterance"),
        default="utterance",
        help="feature statistics over the bare utterances (default) or padded ones, zero "
        "padding included (every frame the encoder sees)",
    )
    p.add_argument("--limit", type=int, help="only the first N files (sorted by utterance id)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def fatal(msg: str, code: int = 1):
    print(f"prepare: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _ensure_packages(packages: list[str], no_install: bool) -> None:
    if no_install:
        return
    try:
        missing = missing_packages(packages)
        if missing:
            install_packages(missing)
    except (RuntimeError, PermissionError) as e:
        fatal(str(e))


def _folder_corpus(args) -> tuple[list[Source], dict]:
    root = Path(args.root)
    if not root.is_dir():
        fatal(f"--root {root} is not a directory")
    sources = folder_sources(root)
    if not sources:
        fatal(f"no {'/'.join(AUDIO_SUFFIXES)} files under {root}")
    return sources, {"corpus": "folder", "root": str(root.resolve())}


def _asterisk_corpus(args) -> tuple[list[Source], dict]:
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    unknown = sorted(set(languages) - set(ASTERISK_LANGUAGES))
    if not languages or unknown:
        fatal(f"--languages: unknown {unknown} (known: {','.join(ASTERISK_LANGUAGES)})", 2)
    sounds = Path(args.sounds_root)
    _ensure_packages(asterisk_packages(languages), args.no_install)
    if not sounds.is_dir():
        fatal(f"{sounds} does not exist (install asterisk-core-sounds-*-g722)")
    sources = asterisk_sources(sounds, languages)
    if not sources:
        fatal(f"no voice folders with .g722 files for {languages} under {sounds}")
    return sources, {"corpus": "asterisk", "root": str(sounds), "languages": languages}


def _fillets_corpus(args) -> tuple[list[Source], dict]:
    sounds = Path(args.fillets_root)
    _ensure_packages([FILLETS_PACKAGE], args.no_install)
    sources = fillets_sources(sounds) if sounds.is_dir() else []
    if not sources:
        fatal(f"no Dutch Fish Fillets dialogue under {sounds} (install {FILLETS_PACKAGE})")
    return sources, {"corpus": "fillets", "root": str(sounds), "languages": ["nl"]}


CORPUS_SOURCES = {
    "asterisk": _asterisk_corpus,
    "fillets": _fillets_corpus,
    "folder": _folder_corpus,
}


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        fatal(f"{out} exists: pass --force to replace it")
    if args.limit is not None and args.limit < 1:
        fatal("--limit must be at least 1", 2)
    try:
        resolve_path(args.config)
    except FileNotFoundError as e:
        fatal(str(e), 2)
    corpora = list(dict.fromkeys(args.corpus))  # in order, once each
    if "folder" in corpora and not args.root:
        fatal("--corpus folder needs --root DIR", 2)
    sources, infos = [], []
    for corpus in corpora:
        found, info = CORPUS_SOURCES[corpus](args)
        sources += found
        infos.append(info)
    info = infos[0] if len(infos) == 1 else {"corpus": "+".join(corpora), "parts": infos}
    hold_out = frozenset(x.strip() for x in (args.hold_out or "").split(",") if x.strip())
    try:
        summary = prepare(
            sources,
            out,
            config=args.config,
            force=args.force,
            padded=args.stats_on == "padded",
            limit=args.limit,
            source_info=info,
            progress=not args.quiet,
            hold_out=hold_out,
        )
    except (RuntimeError, FileExistsError) as e:
        fatal(str(e))
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
