"""The model evaluation (`training.evaluate`) on the app tests' tiny model and a tiny prepared
dataset cut from the test clips: the metrics are wired right (a clip against itself scores
their best), the transcripts and the word error rate, the groups (seen speakers, all of them,
held-out voices), the table, the JSON and the model card, and the usage errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import DATA
from training.dataset import DatasetWriter
from training.evaluate import (
    code_stats,
    constant_codes,
    envelope_correlation,
    log_mel,
    log_mel_distance,
    main,
    markdown_table,
    model_card,
    permuted_codes,
    plan,
    stoi_score,
    word_errors,
)
from training.transcripts import TRANSCRIPTS, Transcripts, normalise, number_words, parse

HAVE_TRANSCRIPTS = TRANSCRIPTS.is_file()
ROOT = Path(__file__).resolve().parent.parent


def pcm(name: str, n: int | None = None) -> np.ndarray:
    x, sr = sf.read(DATA / f"{name}.wav", dtype="int16")
    assert sr == 16000
    return x[:n] if n else x


def write_dataset(root: Path, utterances: list[tuple[str, str, np.ndarray, str]]) -> Path:
    root.mkdir(parents=True)
    writer = DatasetWriter(root, 16000)
    for uid, speaker, samples, split in utterances:
        writer.add(uid, speaker, samples, split)
    writer.close(source={"corpus": "test clips"})
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Allison: two English prompts with transcripts in ``test`` and one in ``train``; June:
    part of a prompt in ``test``; ``heldout/``: one voice the model lacks, in ``train`` only
    (so all of it is evaluated)."""
    root = tmp_path_factory.mktemp("eval") / "data"
    write_dataset(
        root,
        [
            ("en_US_f_Allison/activated", "Allison", pcm("activated"), "test"),
            ("en_US_f_Allison/agent-newlocation", "Allison", pcm("agent-newlocation"), "test"),
            ("en_US_f_Allison/auth-incorrect", "Allison", pcm("auth-incorrect"), "train"),
            (
                "ru_RU_f_IvrvoiceRU/auth-incorrect",
                "IvrvoiceRU",
                pcm("auth-incorrect", 8000),
                "test",
            ),
        ],
    )
    write_dataset(
        root / "heldout",
        [("en_US_m_Nobody/activated", "Nobody", pcm("activated"), "train")],
    )
    return root


@pytest.fixture(scope="module")
def report(app_model_dir, dataset, tmp_path_factory):
    """One full run through the command line: (exit status, stdout, JSON report, card)."""
    out = tmp_path_factory.mktemp("eval_out")
    args = ["--model", str(app_model_dir), "--data", str(dataset), "--json", str(out / "eval.json")]
    args += ["--card", str(out / "MODEL_CARD.md"), "--heldout-voice", "Carlo", "--quiet"]
    (out / "notes.md").write_text("## Training\n\nTwo steps on a laptop.\n")
    args += ["--card-notes", str(out / "notes.md")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(args)
    card = (out / "MODEL_CARD.md").read_text() if status == 0 else ""
    data = json.loads((out / "eval.json").read_text()) if status == 0 else {}
    return status, stdout.getvalue(), data, card


# --- text and metrics -------------------------------------------------------------------------


def test_normalise_writes_what_a_recogniser_writes():
    assert normalise("Please enter a new extension, followed by pound.") == (
        "please enter a new extension followed by pound"
    )
    assert normalise("Press 1 to mute, 22 to lock; you'd 'quoted'.") == (
        "press one to mute twenty two to lock you'd quoted"
    )
    assert normalise("The 1st and 40th of 1,200 (10 seconds of silence)") == (
        "the first and fortieth of one thousand two hundred"
    )
    assert normalise("3D audio: call-forward [beep] 007") == (
        "three d audio call forward zero zero seven"
    )
    assert normalise("[ascending tones]") == ""
    assert number_words(0) == "zero" and number_words(115) == "one hundred fifteen"
    assert number_words(2_000_019) == "two million nineteen"


def test_transcripts_are_found_for_english_asterisk_ids_only():
    lines = ["; comment", "", "activated: Activated.", "digits/5: five", "beep: [a beep]"]
    t = Transcripts(parse(lines))
    assert t.reference("en_US_f_Allison/activated") == "activated"
    assert t.reference("en_GB_m_Other/digits/5") == "five"
    assert t.reference("es_MX_f_Allison/activated") is None  # not English
    assert t.reference("en_US_f_Allison/beep") is None  # no words
    assert t.reference("en_US_f_Allison/missing") is None
    assert t.reference("activated") is None and t.reference("p225/activated") is None


@pytest.mark.skipif(not HAVE_TRANSCRIPTS, reason=f"{TRANSCRIPTS} missing")
def test_the_installed_transcripts_hold_the_test_prompts():
    t = Transcripts.load()
    assert t.reference("en_US_f_Allison/agent-newlocation") == (
        "please enter a new extension followed by pound"
    )
    assert t.reference("en_US_f_Allison/digits/5") == "five"
    assert Transcripts.load(TRANSCRIPTS.parent / "nothing.txt.gz") is None


def test_word_errors_count_substitutions_deletions_and_insertions():
    assert word_errors("a b c d", "a b c d") == 0
    assert word_errors("a b c d", "a x c") == 2  # one substitution, one deletion
    assert word_errors("a b", "a b c d") == 2  # two insertions
    assert word_errors("a b c", "") == 3


def test_metrics_score_a_clip_against_itself_at_their_best():
    x = pcm("agent-newlocation").astype(np.float64) / 32768
    noisy = x + 0.05 * np.random.default_rng(0).standard_normal(len(x))
    assert log_mel(x, 16000).shape == (1 + (len(x) - 400) // 160, 80)
    assert log_mel_distance(x, x, 16000) == 0
    assert log_mel_distance(x, noisy, 16000) > 1
    assert stoi_score(x, x, 16000) > 0.999 and stoi_score(x, noisy, 16000) < 0.95
    assert math.isnan(stoi_score(x[:1000], x[:1000], 16000))  # too short: no score


def test_the_envelope_correlation_tells_a_contour_that_follows_from_one_that_does_not():
    """A quieter copy follows the original's loudness (r = 1), light noise barely moves it; the
    same speech played backwards, or steady noise, does not follow it."""
    x = pcm("agent-newlocation").astype(np.float64) / 32768
    rng = np.random.default_rng(0)
    assert envelope_correlation(x, 0.3 * x, 16000) > 0.99
    assert envelope_correlation(x, x + 0.002 * rng.standard_normal(len(x)), 16000) > 0.9
    assert envelope_correlation(x, x[::-1], 16000) < 0.5
    assert abs(envelope_correlation(x, 0.1 * rng.standard_normal(len(x)), 16000)) < 0.2
    assert math.isnan(envelope_correlation(x, np.zeros_like(x), 16000))


def test_code_statistics_and_the_code_variants():
    stats = code_stats([np.array([0, 0, 1]), np.array([1])], codebook_size=4, frame_rate=50)
    assert stats == {"used": 2, "codebook_size": 4, "perplexity": 2.0, "bits_per_second": 50.0}
    uniform = code_stats([np.arange(8)], 8, 50)
    assert uniform["perplexity"] == pytest.approx(8) and uniform["bits_per_second"] == 150
    codes = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    shuffled = permuted_codes(codes, seed=0, utterance=0)
    assert sorted(shuffled) == sorted(codes) and not np.array_equal(shuffled, codes)
    assert np.array_equal(shuffled, permuted_codes(codes, 0, 0))
    assert not np.array_equal(shuffled, permuted_codes(codes, 0, 1))
    constant, code = constant_codes(codes)
    assert code == 5 and np.array_equal(constant, np.full(len(codes), 5))


# --- the command ------------------------------------------------------------------------------


def test_evaluation_reports_every_group(report):
    status, out, data, _ = report
    assert status == 0
    rows = {r["group"]: r for r in data["rows"]}
    assert list(rows) == ["Allison", "IvrvoiceRU", "seen (all)", "held-out Nobody (as Carlo)"]
    assert [rows[g]["utterances"] for g in rows] == [2, 1, 3, 1]  # the train split left out
    assert rows["seen (all)"]["seconds"] == pytest.approx(
        rows["Allison"]["seconds"] + rows["IvrvoiceRU"]["seconds"]
    )
    assert (
        rows["Allison"]["voice"] == "Allison"
        and rows["held-out Nobody (as Carlo)"]["voice"] == "Carlo"
    )
    for r in data["rows"]:
        assert 0 < r["stoi"] < 0.9  # random weights: a poor copy
        assert r["log_mel"] > 0.5 and r["rtf"] > 0
        assert r["ce_true"] > 0 and r["ce_permuted"] != r["ce_true"]
        assert 1 <= r["used"] <= r["codebook_size"] == 16
        assert r["perplexity"] <= r["used"]
        rate = data["meta"]["frame_rate"]  # the tiny model's hop is short
        assert r["bits_per_second"] == pytest.approx(math.log2(r["perplexity"]) * rate)
    utts = {u["id"]: u for u in data["utterances"]}
    assert set(utts) == {
        "en_US_f_Allison/activated",
        "en_US_f_Allison/agent-newlocation",
        "ru_RU_f_IvrvoiceRU/auth-incorrect",
        "en_US_m_Nobody/activated",
    }
    for u in utts.values():
        assert u["constant_code"] in range(16)
    # The seen group's CE is the sample-weighted mean of its utterances'.
    a = [utts["en_US_f_Allison/activated"], utts["en_US_f_Allison/agent-newlocation"]]
    weighted = sum(u["ce_true"] * u["samples"] for u in a) / sum(u["samples"] for u in a)
    assert rows["Allison"]["ce_true"] == pytest.approx(weighted)
    assert any("voice of Carlo" in note for note in data["notes"])
    assert data["meta"]["precision"] == "fp32" and data["meta"]["heldout_split"] == "all"


@pytest.mark.skipif(not HAVE_TRANSCRIPTS, reason=f"{TRANSCRIPTS} missing")
def test_word_error_rates_come_from_the_transcripts(report):
    _, _, data, _ = report
    rows = {r["group"]: r for r in data["rows"]}
    utts = {u["id"]: u for u in data["utterances"]}
    new = utts["en_US_f_Allison/agent-newlocation"]
    assert new["reference"] == "please enter a new extension followed by pound"
    assert new["words"] == 8 and "hyp_resynth" in new
    assert "words" not in utts["ru_RU_f_IvrvoiceRU/auth-incorrect"]  # no English transcript
    assert rows["Allison"]["wer_utterances"] == 2 and rows["IvrvoiceRU"]["wer_original"] is None
    # The recogniser understands the originals better than the random weights' resynthesis.
    assert rows["Allison"]["wer_original"] < 0.5 < rows["Allison"]["wer_resynth"]
    # The same clip is recognised alike after other audio (the recogniser is reset each time).
    assert utts["en_US_f_Allison/activated"]["hyp_original"] == "activated"
    assert utts["en_US_m_Nobody/activated"]["hyp_original"] == "activated"
    errors = sum(utts[i]["errors_original"] for i in utts if i.startswith("en_US_f_Allison"))
    assert rows["Allison"]["wer_original"] == errors / 9
    assert rows["held-out Nobody (as Carlo)"]["wer_utterances"] == 1


def test_table_and_card_show_the_rows(report):
    _, out, data, card = report
    header = (
        "| group | utts | seconds | STOI | PESQ-WB | log-mel dist. | envelope r | WER original "
        "| WER resynth | CE true | CE permuted | CE constant | codes used/K | perplexity | bits/s "
        "| RTF |"
    )
    assert header in out and markdown_table(data["rows"]) in out
    for r in data["rows"]:
        assert f"| {r['group']} | {r['utterances']} |" in out
        assert f"{r['ce_true']:.3f} | {r['ce_permuted']:.3f}" in out
    assert "| IvrvoiceRU | 1 |" in out and "| – | – |" in out  # IvrvoiceRU: no transcript, no WER
    assert card.startswith("# Model card: ")
    assert "test model with random weights" in card and markdown_table(data["rows"]) in card
    assert "corpus: test clips" in card and "--heldout-voice Carlo" in card
    assert data["meta"]["sampling_temperature"] == 1.0 and "sampling temperature 1," in card
    assert card.endswith("\n\n## Training\n\nTwo steps on a laptop.\n")  # --card-notes
    extra = model_card(data, {"Training": {"config": "tiny", "steps": 0}, "Notes": "None."})
    assert extra.endswith(
        "## Training\n\n- **config**: tiny\n- **steps**: 0\n\n## Notes\n\nNone.\n"
    )


def test_int8_without_recognition_or_cross_entropy(app_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--model", str(app_model_dir), "--data", str(dataset), "--json", str(out)]
    assert (
        main([*args, "--int8", "--no-wer", "--no-ce", "--speakers", "IvrvoiceRU", "--quiet"]) == 0
    )
    data = json.loads(out.read_text())
    assert [r["group"] for r in data["rows"]] == [
        "IvrvoiceRU",
        "seen (all)",
        "held-out Nobody (as Allison)",
    ]
    assert data["meta"]["precision"] == "int8"
    assert all(r["ce_true"] is None and r["wer_original"] is None for r in data["rows"])
    assert "| – | – | – | – | – |" in capsys.readouterr().out


def test_usage_errors_are_one_line_with_exit_status_2(app_model_dir, dataset, tmp_path, capsys):
    model = ["--model", str(app_model_dir)]
    unknown = write_dataset(
        tmp_path / "unknown",
        [
            ("nl_NL_f_Anna/welkom", "Anna", pcm("activated"), "test"),
            ("en_US_f_Allison/activated", "Allison", pcm("activated"), "test"),
        ],
    )
    cases = [
        (["--model", str(tmp_path / "none"), "--data", str(dataset)], "no such model directory"),
        ([*model, "--data", str(tmp_path / "none")], "no such dataset directory"),
        ([*model, "--data", str(tmp_path)], "not a prepared dataset"),
        ([*model, "--data", str(dataset), "--split", "valid"], "split 'valid' is empty"),
        ([*model, "--data", str(unknown)], "speakers Anna of"),
        ([*model, "--data", str(dataset), "--heldout-voice", "Nobody"], "not one of the model's"),
        ([*model, "--data", str(dataset), "--speakers", "Carlo"], "--speakers Carlo: not in"),
        ([*model, "--data", str(dataset), "--limit", "0"], "--limit must be >= 1"),
        ([*model, "--data", str(dataset), "--card-notes", str(tmp_path / "no.md")], "--card-notes"),
    ]
    for args, phrase in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, (args, err)
    with pytest.raises(SystemExit) as exit_:
        main([*model])  # --data is required
    assert exit_.value.code == 2
    capsys.readouterr()
    # Unknown speakers can be dropped instead, with a note.
    args = [*model, "--data", str(unknown), "--no-wer", "--no-ce", "--quiet"]
    assert main([*args, "--skip-unknown-speakers"]) == 0
    out = capsys.readouterr().out
    assert "| Allison | 1 |" in out and "not evaluated: Anna" in out


def test_evaluation_runs_without_torch(app_model_dir, dataset):
    script = (
        "import sys\n"
        "from training.evaluate import main\n"
        f"args = ['--model', {str(app_model_dir)!r}, '--data', {str(dataset)!r}]\n"
        "assert main([*args, '--limit', '1', '--speakers', 'Allison', '--no-ce', '--quiet']) == 0\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "| Allison | 1 |" in done.stdout


def test_plan_notes_held_out_voices_the_model_knows(dataset):
    groups = plan(dataset, ["Allison", "Nobody", "IvrvoiceRU"], limit=1, heldout_voice="Allison")
    assert [(g.name, len(g.indices), g.voice) for g in groups.groups] == [
        ("Allison", 1, "Allison"),
        ("IvrvoiceRU", 1, "IvrvoiceRU"),
        ("held-out Nobody (as Allison)", 1, "Allison"),
    ]
    assert any("Nobody are also speakers of the model" in note for note in groups.notes)
