"""What a user brings and gets back: file permissions, progress in logs."""

import io
import json
import os
import stat
import time

import numpy as np
import pytest
import torch
from _cli import run_cli
from PIL import Image
from test_encoders import _tiny_config

from latentdist._io import atomic_open, save_json, save_text
from latentdist._progress import LogBar, progress_bar


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask022):
    save_json(tmp_path / "a.json", {"x": 1})
    save_text(tmp_path / "b.md", "hi")
    with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary open() gives
        f.write("x")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.md") == 0o644
    assert _mode(tmp_path / "plain.txt") == 0o644
    os.umask(0o077)
    save_json(tmp_path / "a.json", {"x": 2})  # replaced, with the new umask's mode
    assert _mode(tmp_path / "a.json") == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_atomic_write_interrupted_leaves_the_old_file(tmp_path):
    save_text(tmp_path / "r.md", "old")
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "r.md") as f:
        f.write("half")
        raise RuntimeError
    assert (tmp_path / "r.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


def _png_folder(folder, n, size, mode="L", ext="png", seed=0):
    """``n`` random images of ``size`` (H, W) in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = size if mode == "L" else (*size, 3)
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        paths.append(folder / f"{i:04d}.{ext}")
        Image.fromarray(arr, mode).save(paths[-1])
    return paths


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_to_a_log_is_a_few_plain_lines():
    log = _Log()
    bar = progress_bar(range(5000), file=log, desc="fit", leave=True)
    assert isinstance(bar, LogBar)
    bar._interval = 0.05  # a line every 50 ms at most (10 s by default)
    t0 = time.monotonic()
    for _ in bar:
        bar.set_postfix(loss="1.0")  # refreshes on every call, like the fitting loops
        time.sleep(1e-5)
    elapsed = time.monotonic() - t0
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 1 <= len(lines) <= elapsed / 0.05 + 2  # throttled, plus the closing line
    assert "5000/5000" in lines[-1]


def test_progress_off_and_transient_bars_write_nothing():
    log = _Log()
    for _ in progress_bar(range(100), file=log, disable=True):
        pass
    for _ in progress_bar(range(100), file=log, leave=False):  # short and transient
        pass
    assert log.getvalue() == ""


# ------------------------------------------------------------------ diffusers latent statistics

MEAN, STD = [0.1, -0.2, 0.3, 0.05], [0.5, 2.0, 1.5, 0.8]


def _tiny_vae(diffusers, **stats):
    torch.manual_seed(2)
    # 4 latent channels: SDXL's pipeline views its statistics as (1, 4, 1, 1)
    return diffusers.AutoencoderKL(**{**_tiny_config(), "latent_channels": 4}, **stats).eval()


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("vae")
    _tiny_vae(diffusers, scaling_factor=0.7, latents_mean=MEAN, latents_std=STD).save_pretrained(
        root / "stats"
    )
    _tiny_vae(diffusers, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "shift")
    return root


def _pipeline_function(module: str, cls: str):
    """``cls.prepare_latents`` from the installed diffusers' pipeline source, run without importing
    the pipeline module (that needs transformers): its code is taken from the file as it is."""
    import ast
    import importlib.util

    import PIL.Image
    from diffusers.utils.torch_utils import randn_tensor

    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    wanted = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "retrieve_latents"
    ]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            wanted += [n for n in node.body if getattr(n, "name", "") == "prepare_latents"]
    space = {"torch": torch, "PIL": PIL, "randn_tensor": randn_tensor, "Optional": None}
    space["empty_device_cache"] = lambda: None
    exec(compile(ast.Module(body=wanted, type_ignores=[]), spec.origin, "exec"), space)
    return space["prepare_latents"]


def test_diffusers_latent_statistics_as_the_pipelines_apply_them(vae_dirs):
    """Our latent equals what diffusers' own img2img pipelines hand the diffusion model:
    SDXL's (z - latents_mean) * scaling_factor / latents_std, SD3's (z - shift) * scaling."""
    from types import SimpleNamespace

    from latentdist.data import load_data
    from latentdist.data.encoders import load_encoder

    sdxl = _pipeline_function(
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
        "StableDiffusionXLImg2ImgPipeline",
    )
    sd3 = _pipeline_function(
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
        "StableDiffusion3Img2ImgPipeline",
    )
    x = load_data("digits").take(slice(0, 12))
    cases = (("stats", sdxl, {"add_noise": False}), ("shift", sd3, {}))
    for name, pipeline, extra in cases:
        enc = load_encoder(vae_dirs / name, sample=True)  # pipelines sample the posterior
        ours = enc.encode(x, batch_size=len(x), progress=False, seed=3)
        fake = SimpleNamespace(
            vae=enc.module.vae, scheduler=SimpleNamespace(scale_noise=lambda s, t, noise: s)
        )
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            theirs = pipeline(
                fake, x, None, len(x), 1, torch.float32, "cpu", generator=gen, **extra
            )
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert "latents_std" in load_encoder(vae_dirs / "stats").normalisation
    assert "shift_factor 0.1" in load_encoder(vae_dirs / "shift").normalisation
    raw = load_encoder(vae_dirs / "stats", latent_norm=False)
    with torch.no_grad():
        want = raw.module.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(raw.encode(x, progress=False), want, atol=1e-6, rtol=1e-6)
    assert raw.normalisation.startswith("none")


def test_measure_reports_the_normalised_latent(vae_dirs, tmp_path, capsys):
    from latentdist.data import load_data
    from latentdist.data.encoders import load_encoder

    folder = tmp_path / "imgs"
    _png_folder(folder, 60, (8, 8))
    args = ["measure", "--encoder", str(vae_dirs / "stats"), "--data", str(folder)]
    args += ["--generator", "linear", "--steps", "5", "--seeds", "2", "--no-proxies", "--no-progress"]  # fmt: skip
    code, out, err = run_cli([*args, "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert report["encoder"]["normalisation"].startswith("(z - latents_mean) * scaling_factor")
    assert "latent normalisation: (z - latents_mean)" in out
    z = load_encoder(vae_dirs / "stats").encode(load_data(str(folder)), progress=False)
    assert report["latent"]["shape"] == list(z.shape[1:])
    code, out, err = run_cli([*args, "--no-latent-norm", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    raw = json.loads((tmp_path / "r" / "measure.json").read_text())
    assert raw["encoder"]["normalisation"].startswith("none")


# ------------------------------------------------------------------ image folders of any size


def test_default_batch_keeps_the_pixels_per_step():
    from latentdist.dae.config import default_batch_size

    assert default_batch_size((1, 28, 28)) == default_batch_size((16,)) == 64
    assert default_batch_size((1, 64, 64)) == 64
    assert default_batch_size((3, 96, 96)) == 64 * 4096 // (96 * 96) == 28
    assert default_batch_size((1, 250, 250)) == 4  # 4.2 pixels' worth, floored at the minimum
    assert default_batch_size((1, 512, 512)) == 4
    assert default_batch_size((1, 250, 250), world_size=3) == 6  # a multiple of the processes


@pytest.mark.parametrize(
    "size, factor", [((25, 25), 4), ((13, 10), 4), ((7, 9), 2), ((8, 8), 16), ((16, 16), 4)]
)
def test_dae_decoder_of_encoder_keeps_any_image_size(size, factor):
    """The size rule: pad to multiples of --downsample, crop the decoder's output back."""
    from latentdist._shapes import latent_size
    from latentdist.dae import TrainConfig, build_models
    from latentdist.dae.export import ExportDecoder, ExportEncoder

    cfg = TrainConfig(base_width=4, downsample=factor, latent_channels=2, num_res_blocks=1)
    shape = (3, *size)
    m = build_models(cfg, shape, "images", torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    enc, dec = ExportEncoder.of(m).eval(), ExportDecoder(m.decoder, m.denormalize, m.crop).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        z = enc(x)
        assert tuple(z.shape[2:]) == latent_size(*size, factor)
        assert dec(z).shape == x.shape
    if size[0] % factor == 0 and size[1] % factor == 0:  # divisible sizes: nothing added
        assert isinstance(m.pad, torch.nn.Identity) and isinstance(m.crop, torch.nn.Identity)


def test_conv_generator_crops_to_any_image_size():
    from latentdist.generators.modules import make_generator, upsampling_factor

    assert upsampling_factor((4, 7, 7), (1, 25, 25)) == 2
    assert upsampling_factor((4, 4, 4), (1, 16, 16)) == 2
    g = make_generator("conv", (4, 7, 4), (3, 25, 13), capacity=4)
    assert g(torch.randn(2, 4, 7, 4)).shape == (2, 3, 25, 13)
    with pytest.raises(Exception, match="ceil"):
        upsampling_factor((4, 5, 5), (1, 25, 25))


def test_conv_generator_halves_its_channels_per_upsampling_and_stays_nested():
    """Width c at the latent, ceil(c/2^level) after each 2x upsampling (at least min(c, 4)):
    each level costs about the same. A narrower generator embeds exactly in a wider one."""
    from latentdist.generators.modules import conv_level_width, embed_generator, make_generator

    g = make_generator("conv", (4, 6, 6), (3, 24, 24), capacity=32, depth=2)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs] == [32, 16, 16, 8, 8, 3]
    assert [conv_level_width(4, j) for j in range(4)] == [4, 4, 4, 4]
    assert [conv_level_width(5, j) for j in range(3)] == [5, 4, 4]
    torch.manual_seed(0)
    small = make_generator("conv", (4, 6, 6), (3, 24, 24), capacity=5, depth=2)
    big = embed_generator(small, make_generator("conv", (4, 6, 6), (3, 24, 24), 32, depth=2))
    z = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(big(z), small(z))


def test_default_fitting_batch_keeps_the_pixels_per_step():
    """256 rows up to 32 x 32 pixels (MNIST, CIFAR, vectors), then 256*1024/(H*W), at least 16;
    measure.json reports the batch used, capped by the fitting rows."""
    from latentdist.estimator.config import default_fit_batch
    from latentdist.estimator.sweep import fit_batch_size

    assert default_fit_batch((784,)) == default_fit_batch((1, 28, 28)) == 256
    assert default_fit_batch((3, 32, 32)) == 256
    assert default_fit_batch((3, 64, 64)) == 64
    assert default_fit_batch((3, 96, 96)) == 28
    assert default_fit_batch((1, 250, 250)) == 16
    rows = [torch.arange(150)]
    assert fit_batch_size(None, (3, 96, 96), rows, rows) == 28
    assert fit_batch_size(None, (1, 28, 28), rows, rows) == 150
    assert fit_batch_size(64, (3, 96, 96), rows, rows) == 64
    # one rule for every default batch on images (train-dae's, the feature network's)
    from latentdist._shapes import pixel_budget_batch
    from latentdist.dae.config import default_batch_size

    assert default_batch_size((1, 250, 250)) == pixel_budget_batch((1, 250, 250), 64, 4096, 4) == 4
    assert pixel_budget_batch((3, 64, 64), 128, 1024, 16) == 32  # the feature network at 64x64


@pytest.fixture(scope="module")
def grey25(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grey25")
    _png_folder(folder, 48, (25, 25))
    return folder


def test_image_folder_is_read_lazily(tmp_path):
    """Loading reads headers only; encoding decodes one batch at a time, never the folder: the
    memory it allocates stays under a quarter of the folder's decoded size."""
    import tracemalloc

    from latentdist.data import load_data
    from latentdist.data.encoders import Encoder

    _png_folder(tmp_path, 40, (96, 96))
    src = load_data(str(tmp_path))
    assert src.array.decoded == 0 and src.sample_shape == (1, 96, 96)
    rows: list[int] = []
    original = src.array.__class__.__getitem__

    def counting(self, index):
        out = original(self, index)
        rows.append(1 if np.ndim(out) == 3 else len(out))
        return out

    whole = len(src) * 96 * 96 * 4  # the folder as float32: 1.5 MB
    budget = whole // 4
    enc = Encoder(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), "pool", "torchscript")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(src.array.__class__, "__getitem__", counting)
        tracemalloc.start()
        z = enc.encode(src, batch_size=4, progress=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert z.shape == (40, 4) and max(rows) == 4 and sum(rows) == 40
    assert peak < budget, f"peak {peak} B for a {whole} B folder"
    with torch.no_grad():
        assert torch.allclose(z, enc.module(src.take()))


def test_mixed_folders_name_two_files_or_convert(tmp_path, capsys):
    from latentdist.data import ImageOptions, load_data

    mixed = tmp_path / "sizes"
    a = _png_folder(mixed, 2, (25, 25))
    b = _png_folder(mixed / "sub", 1, (30, 20))
    code, _, err = run_cli(
        ["train-dae", "--data", str(mixed), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(a[0]) in err and str(b[0]) in err and "--resize" in err
    assert not (tmp_path / "o").exists()  # nothing written
    src = load_data(str(mixed), image=ImageOptions(resize=(20, 24)))
    assert src.take().shape == (3, 1, 20, 24)

    colours = tmp_path / "colours"
    grey = _png_folder(colours, 1, (9, 9))
    rgb = _png_folder(colours, 1, (9, 9), mode="RGB", ext="jpg")
    code, _, err = run_cli(["measure", "--latents", "x.npy", "--data", str(colours)], capsys)
    assert code == 2 and str(grey[0]) in err and str(rgb[0]) in err and "--channels" in err
    assert load_data(str(colours), image=ImageOptions("rgb")).sample_shape == (3, 9, 9)
    assert load_data(str(colours), image=ImageOptions("grey")).sample_shape == (1, 9, 9)

    broken = tmp_path / "broken"
    _png_folder(broken, 2, (9, 9))
    (broken / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run_cli(["measure", "--latents", "x.npy", "--data", str(broken)], capsys)
    assert code == 2 and "0001.png" in err and "corrupt" in err and err.count("\n") == 1


TINY_DAE = ["--base-width", "4", "--latent-channels", "2", "--batch-size", "8", "--stage1-steps", "3", "--stage2-steps", "3", "--checkpoint-every", "3", "--log-every", "1"]  # fmt: skip


def test_train_measure_compare_on_25x25_photos(grey25, tmp_path, capsys, umask022):
    """Defaults' --downsample 4 on 25x25 images; outputs group-readable; curves in the run."""
    from latentdist.data import load_data

    run = tmp_path / "run"
    code, out, err = run_cli(["train-dae", "--data", str(grey25), "--out", str(run), *TINY_DAE], capsys)  # fmt: skip
    assert code == 0, err
    assert "\r" not in err and len(err.splitlines()) <= 3  # stderr is no terminal here
    info = json.loads((run / "run.json").read_text())
    assert info["data_shape"] == [1, 25, 25] and info["latent_shape"] == [2, 7, 7]
    enc, dec = torch.jit.load(str(run / "encoder.pt")), torch.jit.load(str(run / "decoder.pt"))
    x = load_data(str(grey25)).take(slice(0, 5))
    assert dec(enc(x)).shape == x.shape
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_rec" in r] == [3, 6]
    assert {r["stage"] for r in records if "val_rec" in r} == {"stage1", "stage2"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("run.json", "curves.png", "encoder.pt", "metrics.jsonl", "model.safetensors"):
        assert _mode(run / name) == 0o644, name

    flags = ["--capacities", "2,4", "--steps", "5", "--seeds", "2", "--n-eval", "10", "--no-proxies", "--no-progress"]  # fmt: skip
    code, out, err = run_cli(["measure", "--encoder", str(run / "encoder.pt"), "--data", str(grey25), "--generator", "conv", *flags, "--out", str(tmp_path / "m")], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert report["latent"]["shape"] == [2, 7, 7]
    # a batch of 256 from the rows one seed fits on would only repeat them
    assert report["fit_batch_size"] == report["fit_diagnostics"]["train_rows"] < 256
    assert _mode(tmp_path / "m" / "measure.json") == 0o644

    cmp_flags = ["--gen-seeds", "1", "--probe-steps", "20", "--feature-steps", "5", "--prior-components", "2", "--prior-pca", "4", "--k", "2"]  # fmt: skip
    code, out, err = run_cli(["compare", str(run), "--data", str(grey25), *flags, *cmp_flags, "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert code == 0, err
    written = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"compare.json", "report.md"}
    assert all(_mode(p) == 0o644 for p in written), [(p.name, oct(_mode(p))) for p in written]


def test_tensorboard_events_and_a_clear_error_without_the_package(grey25, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    args = ["train-dae", "--data", str(grey25), *TINY_DAE, "--no-progress", "--tensorboard"]
    code, _, err = run_cli([*args, "--out", str(run)], capsys)
    assert code == 0, err
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/rec", "val/rec"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/rec")] == [3, 6]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(__import__("sys").modules, "tensorboard", None)
        code, _, err = run_cli([*args, "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "latentdist[tensorboard]" in err and err.count("\n") == 1
    assert not (tmp_path / "none").exists()
