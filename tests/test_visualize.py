"""The "where thinking helps" page: its log-likelihood changes against KV-cached decoding with the
same thoughts and the plain forward, and the HTML itself, parsed."""

import html.parser
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import save_tiny_checkpoint

from qstar_jax import loading, visualize
from qstar_jax.generate import Decoder
from qstar_jax.model import Transformer

TEXT = "the cat sat on a mat\nbecause why 42 naïve 東京 & <b>bold</b> \"quoted\"."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vis") / "ckpt"
    save_tiny_checkpoint(path, seed=2)
    return str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return loading.load_checkpoint(checkpoint)


def test_deltas_equal_decoding_with_the_same_thoughts(loaded):
    cfg, params, tok = loaded
    scores = visualize.score_text(params, cfg, tok, TEXT)
    ids = [tok.bos_id] + tok.encode(TEXT)
    assert [s.token for s in scores] == ids[1:]
    assert all(s.delta is not None and len(s.thought) == cfg.n_sampled for s in scores)
    # Base log p from the plain forward; thinking log p from think-then-speak decoding fed the
    # page's own thoughts and tokens.
    forward = jax.jit(lambda p, t: Transformer(cfg.model).apply({"params": p}, t))
    base = jax.nn.log_softmax(forward(params["decoder"], jnp.asarray([ids]))[0], -1)
    dec = Decoder(cfg)
    state = dec.start(params, [ids[:1]], len(ids), jax.random.key(0))
    for i, s in enumerate(scores):
        state, out = dec.step(params, state, jnp.asarray([s.token]), jnp.asarray([s.thought]))
        mixed = jax.nn.log_softmax(out.logits_BV[0])[s.token]
        assert s.logp_base == pytest.approx(float(base[i, s.token]), abs=1e-4)
        assert s.delta == pytest.approx(float(mixed - base[i, s.token]), abs=1e-4)
    assert np.std([s.delta for s in scores]) > 1e-3  # the mixing head is not zero


def test_windows_score_every_token(loaded):
    cfg, params, tok = loaded
    long = " ".join([TEXT] * 3)
    scores = visualize.score_text(params, cfg, tok, long, window=7)
    assert "".join(s.piece for s in scores) == long
    assert all(s.delta is not None for s in scores)  # BOS predicts the first, windows overlap
    with pytest.raises(ValueError, match="window"):
        visualize.score_text(params, cfg, tok, long, window=2)


class Spans(html.parser.HTMLParser):
    """Collects each <span class="tok">: its attributes and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self.current = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span" and ("class", "tok") in attrs:
            self.current = dict(attrs, text="")
            self.spans.append(self.current)

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self.current = None


def test_cli_writes_a_page_with_one_span_per_token(checkpoint, loaded, tmp_path, capsys):
    cfg, params, tok = loaded
    text_file, out = tmp_path / "text.txt", tmp_path / "report.html"
    text_file.write_text(TEXT, encoding="utf-8")
    visualize.main(["--checkpoint", checkpoint, "--text", str(text_file), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    parser = Spans()
    parser.feed(page)
    spans = parser.spans
    assert len(spans) == len(tok.encode(TEXT))
    assert "".join(s["text"] for s in spans) == TEXT
    signs = set()
    for s in spans:
        delta = float(s["data-delta"])
        rgba = re.fullmatch(r"background-color: rgba\((\d+), (\d+), (\d+), ([\d.]+)\)", s["style"])
        red, green = int(rgba.group(1)), int(rgba.group(2))
        assert (green > red) == (delta > 0)
        signs.add(delta > 0)
        assert "<|startthought|>" in s["title"] and "<|endthought|>" in s["title"]
        assert f"{delta:+.4f}" in s["title"]
    assert signs == {True, False}  # this model's thinking helps some tokens and hurts others


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe caf\xe9", "not UTF-8 text"),
    (b"", "empty"),
    (b" \n\t", "empty"),
])
def test_cli_rejects_bad_text_files(checkpoint, tmp_path, capsys, content, message):
    text_file = tmp_path / "bad.txt"
    text_file.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", checkpoint, "--text", str(text_file),
                        "--out", str(tmp_path / "r.html")])
    assert e.value.code == 1  # found as the command runs
    err = capsys.readouterr().err
    assert message in err and "bad.txt" in err
    assert not (tmp_path / "r.html").exists()


def test_cli_missing_text_file(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        visualize.main(["--checkpoint", checkpoint, "--text", str(tmp_path / "none.txt"),
                        "--out", str(tmp_path / "r.html")])
    assert "no such text file" in capsys.readouterr().err


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine")
def test_page_renders_in_a_headless_browser(checkpoint, loaded, tmp_path):
    """Chromium parses the page into one coloured span per token and draws it."""
    _, _, tok = loaded
    text_file, out, png = tmp_path / "text.txt", tmp_path / "report.html", tmp_path / "r.png"
    text_file.write_text(TEXT, encoding="utf-8")
    visualize.main(["--checkpoint", checkpoint, "--text", str(text_file), "--out", str(out)])
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run(browser + ["--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    parser = Spans()
    parser.feed(dom)
    assert len(parser.spans) == len(tok.encode(TEXT))
    assert all(s["style"].startswith("background-color: rgba(") for s in parser.spans)
    subprocess.run(browser + [f"--screenshot={png}", "--window-size=800,400", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_checks_the_output_path_before_any_work(tmp_path, capsys):
    """A missing --out directory is named before the model is even read (the checkpoint here
    does not exist), so no scoring is lost to it."""
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(tmp_path / "no_model"), "--text", str(text_file),
                        "--out", str(tmp_path / "missing_dir" / "r.html")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out={tmp_path / 'missing_dir' / 'r.html'}: the directory ")
    assert "does not exist" in err and len(err.splitlines()) == 1
