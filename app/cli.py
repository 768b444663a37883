"""Encode speech to codes files, decode them, or resynthesise, for files and whole folders.

    python -m app.cli encode speech.wav                      # -> speech.vqwc
    python -m app.cli decode speech.vqwc --speaker June      # -> speech.decoded.wav
    python -m app.cli resynth corpus/ -o out/ --speaker 2    # -> out/**/NAME.resynth.wav

Runs on the onnxruntime engine (no torch); same checks and messages as the web app.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from app.service import DEFAULT_MODEL, CodecService, InputError, ModelLoadError
from vqwavenet import DecodeRequest
from vqwavenet.audio import save_wav
from vqwavenet.codes_file import SUFFIX
from vqwavenet.safe_text import printable, show_path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3
OUTPUT_SUFFIX = {"encode": SUFFIX, "decode": ".decoded.wav", "resynth": ".resynth.wav"}
# Audio this tool writes: never taken as input when a folder is searched, so running it twice
# on a folder (outputs beside the inputs) does not process its own outputs.
OWN_AUDIO_OUTPUTS = (OUTPUT_SUFFIX["decode"], OUTPUT_SUFFIX["resynth"])
PROG = "python -m app.cli"


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf")


def _audio_suffixes() -> set[str]:
    """Audio extensions searched for in folders (those of the list this libsndfile reads)."""
    readable = {"." + ext.lower() for ext in sf.available_formats()} | {".aif", ".oga", ".opus"}
    return {s for s in AUDIO_SUFFIXES if s in readable}


EPILOG = f"""\
outputs:
  Each input INPUT.EXT gives INPUT{SUFFIX} (encode), INPUT.decoded.wav (decode) or
  INPUT.resynth.wav (resynth), beside the input or, with -o DIR, under DIR (a folder's layout
  is kept). With one input file, -o may also name the output file itself; with several, an
  -o that looks like a file name (NAME.EXT) is refused unless it is an existing folder or
  ends with a separator. An existing output is never overwritten without --force.
  Folders are searched recursively for codes files (decode: *{SUFFIX}) or audio files
  (encode, resynth), except this tool's own outputs (*.decoded.wav, *.resynth.wav); files
  named explicitly are tried whatever their name. Audio files are those named
  {{audio}}

exit status:
  {EXIT_OK}  every input was processed
  {EXIT_FAILED}  some inputs failed (each is named on stderr; the others were processed)
  {EXIT_USAGE}  usage error: bad options, no inputs found, two inputs with one output, a file
     name given as -o for several inputs
  {EXIT_MODEL}  the model directory cannot be loaded
""".replace("{audio}", " ".join("*" + s for s in sorted(_audio_suffixes())))


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def get_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser; ``prog`` is how the user ran it (``vqwavenet`` passes its own name, so
    ``vqwavenet encode --help`` says ``vqwavenet encode``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model directory")
    common.add_argument(
        "-o", "--out", default=None, help="output folder (or output file, for one input file)"
    )
    common.add_argument("--force", action="store_true", help="overwrite existing outputs")
    common.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="longest audio accepted (and longest a codes file may decode to), seconds; "
        "default: no limit (encoding works in bounded chunks, decoding shows its progress)",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--int8",
        action="store_true",
        help="decode with the int8 graphs (export --int8): faster in large batches",
    )
    voice = argparse.ArgumentParser(add_help=False)
    voice.add_argument("--seed", type=int, default=0, help="sampling seed (>= 0)")
    voice.add_argument(
        "--batch-seconds",
        type=float,
        default=60.0,
        help="audio decoded together in one batch (0: one file at a time)",
    )

    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{encode,decode,resynth}")
    e = sub.add_parser(
        "encode",
        parents=[common],
        help="audio -> codes files",
        description="Encode audio files to codes files.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or folders")
    e.add_argument(
        "--speaker", default=None, help="default speaker stored in the file (name or index)"
    )
    d = sub.add_parser(
        "decode",
        parents=[common, voice],
        help="codes files -> wav",
        description="Decode codes files to 16-bit wav at the model's rate.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    d.add_argument("inputs", nargs="+", metavar="CODES", help="codes files or folders")
    d.add_argument("--speaker", default=None, help="speaker (name or index; default: the file's)")
    r = sub.add_parser(
        "resynth",
        parents=[common, voice],
        help="audio -> audio in a speaker's voice",
        description="Encode and decode audio files, in another speaker's voice if asked.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or folders")
    r.add_argument("--speaker", default=None, help="target speaker (name or index; default 0)")
    for command in (e, d, r):  # option errors found after parsing name the subcommand
        command.set_defaults(command_parser=command)
    return p


@dataclass
class Job:
    """One input and where its output goes."""

    source: Path
    output: Path


class UsageError(Exception):
    pass


def is_own_output(path: Path) -> bool:
    """Whether ``path`` is named like audio this tool writes (``NAME.resynth.wav`` ...)."""
    return path.name.lower().endswith(OWN_AUDIO_OUTPUTS)


def find_inputs(paths: list[str], suffixes: set[str]) -> list[tuple[Path, Path]]:
    """``(file, path relative to its output root)`` for every input; folders are searched
    recursively for ``suffixes``, skipping this tool's own outputs; files and missing paths
    are kept as given (a missing one fails later with its own message)."""
    found = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            matching = [f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes]
            files = sorted(f for f in matching if not is_own_output(f))
            if not files:
                looked = ", ".join(sorted(suffixes))
                skipped = len(matching)
                note = f"; {skipped} output{'s' * (skipped != 1)} of this tool skipped"
                raise UsageError(
                    f"{show_path(arg)}: no input files in this folder (looked for {looked}"
                    f"{note if skipped else ''})"
                )
            found += [(f, f.relative_to(path)) for f in files]
        else:
            found.append((path, Path(path.name)))
    return found


def output_name(rel: Path, suffix: str) -> Path:
    return rel.with_name(rel.stem + suffix) if rel.suffix else rel.with_name(rel.name + suffix)


def plan(inputs: list[str], command: str, out: str | None) -> list[Job]:
    """Pair inputs with outputs (see the epilog); `UsageError` on a clash."""
    suffixes = {SUFFIX} if command == "decode" else _audio_suffixes()
    found = find_inputs(inputs, suffixes)
    suffix = OUTPUT_SUFFIX[command]
    single_file = len(found) == 1 and not Path(inputs[0]).is_dir()
    out_is_dir = out is not None and (Path(out).is_dir() or out.endswith(("/", os.sep)))
    if out is not None and not single_file and not out_is_dir:
        several = f"{len(found)} inputs" if len(found) > 1 else "a folder as input"
        if Path(out).exists():
            raise UsageError(f"-o {show_path(out)}: is a file, but {several} need a folder")
        if Path(out).suffix:
            raise UsageError(
                f"-o {show_path(out)}: looks like a file name, but {several} need a folder "
                f"(end it with {os.sep} to make a folder of that name)"
            )
    jobs = []
    for source, rel in found:
        if out is None:
            target = output_name(source, suffix)
        elif single_file and not out_is_dir:
            target = Path(out)
        else:
            target = Path(out) / output_name(rel, suffix)
        jobs.append(Job(source, target))
    seen: dict[str, Path] = {}
    for job in jobs:
        key = os.path.abspath(job.output)
        if key in seen:
            raise UsageError(
                f"{show_path(seen[key])} and {show_path(job.source)} would both be written to "
                f"{show_path(job.output)}: give them separate output folders"
            )
        if os.path.abspath(job.source) == key:
            raise UsageError(f"{show_path(job.source)}: the output would overwrite the input")
        seen[key] = job.source
    return jobs


def write_atomically(target: Path, write: Callable[[Path], None], force: bool) -> None:
    """Write via a temporary file in the same folder, so a failure leaves no partial output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        write(Path(tmp))
        if force:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)  # atomic, and fails if the target appeared meanwhile
        except FileExistsError:
            raise FileExistsError(
                f"{show_path(target)}: exists (use --force to overwrite)"
            ) from None
        except OSError:  # a file system without hard links: check, then rename
            if target.exists():
                raise FileExistsError(
                    f"{show_path(target)}: exists (use --force to overwrite)"
                ) from None
            os.replace(tmp, target)
        else:
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fail(message: str) -> None:
    tqdm.write(f"error: {printable(message)}", file=sys.stderr)


def _done(job: Job) -> None:
    print(f"{show_path(job.source)} -> {show_path(job.output)}", flush=True)


def run(args: argparse.Namespace, service: CodecService, jobs: list[Job]) -> int:
    """Process every job; one failing input never stops the others.

    Decoding (decode, resynth) goes in batches of about ``--batch-seconds`` of audio: the
    engine generates the segments of every file of a batch side by side, which fills its rows
    and is several times faster than one file at a time on a folder of short files."""
    failed = 0
    bar = tqdm(total=len(jobs), desc=args.command, unit="file", disable=args.quiet, file=sys.stderr)
    batch: list[tuple[Job, DecodeRequest]] = []

    def fail(job: Job, e: BaseException) -> None:
        nonlocal failed
        failed += 1
        name, msg = show_path(job.source), printable(str(e))
        if isinstance(e, ValueError | OSError):  # InputError is a ValueError
            _fail(msg if name in msg else f"{name}: {msg}")
        else:  # an engine failure on one input must not stop the others
            _fail(f"{name}: internal error ({type(e).__name__}: {msg})")

    def flush() -> None:
        if not batch:
            return
        label = show_path(batch[0][0].source.name)
        label += f" +{len(batch) - 1}" if len(batch) > 1 else ""
        try:
            waves = _with_bar(
                args, label, lambda cb: service.decode_many([r for _, r in batch], cb)
            )
        except Exception as e:
            for job, _ in batch:
                fail(job, e)
        else:
            for (job, _), wave in zip(batch, waves):
                try:
                    write_atomically(job.output, _wav_writer(wave, service.sample_rate), args.force)
                    _done(job)
                except Exception as e:
                    fail(job, e)
        bar.update(len(batch))
        batch.clear()

    for job in jobs:
        bar.set_postfix_str(show_path(job.source.name))
        if job.output.exists() and not args.force:
            _fail(
                f"{show_path(job.output)}: exists (use --force to overwrite); skipped "
                f"{show_path(job.source)}"
            )
            failed += 1
            bar.update(1)
            continue
        try:
            request = prepare(args, service, job)
        except Exception as e:
            fail(job, e)
            bar.update(1)
            continue
        if request is None:  # encoded and written
            _done(job)
            bar.update(1)
            continue
        batch.append((job, request))
        if sum(r.n_samples for _, r in batch) >= args.batch_seconds * service.sample_rate:
            flush()
    flush()
    bar.close()
    if failed:
        print(f"{failed} of {len(jobs)} input(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def prepare(args: argparse.Namespace, service: CodecService, job: Job) -> DecodeRequest | None:
    """Encode writes its codes file and returns None; decode and resynth return the checked
    request to decode in a batch."""
    if args.command == "encode":
        enc = service.encode(str(job.source), args.speaker)
        write_atomically(job.output, enc.codes.write, args.force)
        return None
    if args.command == "decode":
        cf = service.read_codes(str(job.source))
    else:
        cf = service.encode(str(job.source), args.speaker).codes
    return service.request(cf, args.speaker, args.seed)


def _wav_writer(wave, sample_rate: int) -> Callable[[Path], None]:
    return lambda path: save_wav(path, wave, sample_rate)


def _with_bar(args, label: str, work):
    """Run ``work(progress_callback)`` under a generation progress bar."""
    with tqdm(
        total=1,
        desc=f"  {label}",
        unit="step",
        leave=False,
        disable=args.quiet,
        file=sys.stderr,
    ) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return work(progress)


def main(argv=None, prog: str = PROG) -> int:
    """Run the CLI on ``argv`` (default: the command line); ``prog`` names it in help and
    usage messages."""
    args = get_parser(prog).parse_args(argv)
    parser = args.command_parser
    if args.max_seconds is not None and not (
        math.isfinite(args.max_seconds) and args.max_seconds > 0
    ):
        parser.error(f"--max-seconds must be a positive number, got {args.max_seconds}")
    if getattr(args, "seed", 0) < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not getattr(args, "batch_seconds", 0) >= 0:
        parser.error(f"--batch-seconds must be >= 0, got {args.batch_seconds}")
    try:
        jobs = plan(args.inputs, args.command, args.out)
    except UsageError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    try:
        service = CodecService(args.model, max_seconds=args.max_seconds, int8=args.int8)
    except ModelLoadError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return EXIT_MODEL
    if args.speaker is not None:
        try:
            service.speaker_index(args.speaker)
        except InputError as e:
            print(f"error: --speaker: {printable(str(e))}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return run(args, service, jobs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
