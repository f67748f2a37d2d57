"""The field's feature spaces from a local weights file (``--features inception:PATH`` and
``dinov2:PATH``): randomly initialised networks of the reference architectures, saved in the
format users hold, give through latentdist the features the reference packages give, and FD on
them equals FD computed directly from those features. Skipped without the packages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdist.data import load_data
from latentdist.discrepancy.pretrained import dinov2_preprocess, load_pretrained
from latentdist.estimator.split import distance_split
from tests._cli import run_cli


def _importable(module: str):
    """``module``, or a skip when it does not import (torchvision beside a foreign torch raises
    RuntimeError, not ImportError)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:
        pytest.skip(f"{module} does not import: {type(err).__name__}")


def _hub_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model's weights under the names torch hub saves DINOv2 with
    (facebookresearch/dinov2, ``DinoVisionTransformer.state_dict()``)."""
    sd = model.state_dict()
    hub = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        hub["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(model.config.num_hidden_layers):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        hub[q + "ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
        hub[q + "ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
        for leaf in ("weight", "bias"):
            qkv = [sd[f"{p}attention.{n}_proj.{leaf}"] for n in "qkv"]
            hub[f"{q}attn.qkv.{leaf}"] = torch.cat(qkv)
            hub[f"{q}attn.proj.{leaf}"] = sd[f"{p}attention.o_proj.{leaf}"]
            for n in ("norm1", "norm2"):
                hub[f"{q}{n}.{leaf}"] = sd[f"{p}{n}.{leaf}"]
            if model.config.use_swiglu_ffn:
                gate_up = [sd[f"{p}mlp.{n}_proj.{leaf}"] for n in ("gate", "up")]
                hub[f"{q}mlp.w12.{leaf}"] = torch.cat(gate_up)
                hub[f"{q}mlp.w3.{leaf}"] = sd[f"{p}mlp.down_proj.{leaf}"]
            else:
                for n in ("fc1", "fc2"):
                    hub[f"{q}mlp.{n}.{leaf}"] = sd[f"{p}mlp.{n}.{leaf}"]
    return hub


def _random_dinov2(path, registers: int = 0, swiglu: bool = False):
    """A small randomly initialised DINOv2 (transformers), saved as torch hub saves one; returns
    the reference model. 64-wide heads as every DINOv2; 224 x 224 positions."""
    transformers = _importable("transformers")
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, patch_size=14)
    kw.update(image_size=224, use_swiglu_ffn=swiglu)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**kw, num_register_tokens=registers)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():  # layer scales and tokens away from their initial constants
        for name, p in model.named_parameters():
            if "lambda1" in name or "token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    torch.save(_hub_state_dict(model), path)
    return model.eval()


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (0, True)])
def test_dinov2_hub_checkpoint_gives_the_reference_features(tmp_path, registers, swiglu):
    """The hub checkpoint of a random DINOv2 (plain, with registers, SwiGLU), loaded through
    ``dinov2:PATH``, gives the reference network's class token bit for bit."""
    ref = _random_dinov2(tmp_path / "hub.pth", registers, swiglu)
    net = load_pretrained("dinov2", tmp_path / "hub.pth")
    x = load_data("digits").take(slice(0, 6))
    with torch.no_grad():
        ours = net(x)
        theirs = ref(pixel_values=dinov2_preprocess(x)).pooler_output
    assert ours.shape == (6, 64)
    assert float((ours - theirs).abs().max()) <= 1e-6 * float(theirs.abs().max())
    assert float(ours.std(0).mean()) > 1e-3  # features that vary across images


def _numpy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussian fits (unbiased covariances), computed apart from latentdist's:
    with S_a = A A^T, S_b = B B^T (A = centred a^T / sqrt(n_a - 1)), Tr (S_a S_b)^(1/2) is the
    sum of the singular values of A^T B, exact also for the singular covariances of few rows
    (where pytorch-fid's scipy sqrtm of S_a S_b is not)."""
    ca = (a - a.mean(0)).T / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)).T / np.sqrt(len(b) - 1)
    tr_root = np.linalg.svd(ca.T @ cb, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * tr_root)


def _cli_fd(capsys, smp: str, ref: str, features: str, n_eval: int) -> dict:
    args = ["distance", smp, "--data", ref, "--metric", "fd", "--features", features]
    args += ["--n-eval", str(n_eval), "--seeds", "2", "--format", "json", "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return json.loads(out)


def test_fd_dinov2_through_the_cli_equals_fd_of_the_reference_features(tmp_path, capsys):
    """``latentdist distance --metric fd --features dinov2:PATH`` on digits: every seed's value
    is FD (scipy) between the reference network's features of that seed's rows."""
    ref_model = _random_dinov2(tmp_path / "hub.pth")
    digits = load_data("digits").take()
    smp, ref = digits[:100] * 0.8, digits[100:300]  # samples: the digits, dimmed
    np.save(tmp_path / "smp.npy", smp.numpy())
    np.save(tmp_path / "ref.npy", ref.numpy())
    feats = f"dinov2:{tmp_path / 'hub.pth'}"
    r = _cli_fd(capsys, str(tmp_path / "smp.npy"), str(tmp_path / "ref.npy"), feats, 80)
    assert r["features"] == "dinov2" and "DINOv2" in r["space"]
    with torch.no_grad():
        f_smp = ref_model(pixel_values=dinov2_preprocess(smp)).pooler_output.double().numpy()
        f_ref = ref_model(pixel_values=dinov2_preprocess(ref)).pooler_output.double().numpy()
    for i, s in enumerate(r["seeds"]):
        sp = distance_split(len(ref), len(smp), 80, s, fit=None)
        direct = _numpy_fd(f_smp[sp.smp_eval], f_ref[sp.ref_eval])
        assert r["distance"]["per_seed"][i] == pytest.approx(direct, rel=1e-4)
        floor = _numpy_fd(f_ref[sp.ref_floor], f_ref[sp.ref_eval])
        assert r["floor"]["per_seed"][i] == pytest.approx(floor, rel=1e-4)


def _rgb_folder(folder, n: int, shift: int, seed: int, size: int = 224) -> list:
    """``n`` random ``size`` x ``size`` RGB PNGs (values 0..199 shifted up by ``shift``)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(arr, "RGB").save(paths[-1])
    return paths


def _pil_dinov2_input(paths) -> torch.Tensor:
    """dgm-eval's input for 224 x 224 files: PIL RGB, ToTensor, ImageNet Normalize (the
    224 x 224 resize is the identity on them)."""
    x = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    ).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def test_fd_dinov2_on_image_folders(tmp_path, capsys):
    """Two folders of PNGs: latentdist's features of the folder equal the reference network's
    on the files as dgm-eval reads them, and the CLI's FD equals FD of those features."""
    ref_model = _random_dinov2(tmp_path / "hub.pth")
    smp_paths = _rgb_folder(tmp_path / "smp", 12, 40, 1)
    ref_paths = _rgb_folder(tmp_path / "ref", 24, 0, 2)
    net = load_pretrained("dinov2", tmp_path / "hub.pth")
    with torch.no_grad():
        ours = net(load_data(tmp_path / "ref").take())
        f_ref = ref_model(pixel_values=_pil_dinov2_input(ref_paths)).pooler_output
        f_smp = ref_model(pixel_values=_pil_dinov2_input(smp_paths)).pooler_output
    assert float((ours - f_ref).abs().max()) <= 1e-5 * float(f_ref.abs().max())
    feats = f"dinov2:{tmp_path / 'hub.pth'}"
    r = _cli_fd(capsys, str(tmp_path / "smp"), str(tmp_path / "ref"), feats, 10)
    sp = distance_split(24, 12, 10, r["seeds"][0], fit=None)
    a, b = f_smp.double().numpy(), f_ref.double().numpy()
    direct = _numpy_fd(a[sp.smp_eval], b[sp.ref_eval])  # 10 rows in 64 dimensions
    assert r["distance"]["per_seed"][0] == pytest.approx(direct, rel=1e-4)
    assert r["verdict"] in ("above", "within")


def _bad(capsys, tmp_path, features: str) -> str:
    np.save(tmp_path / "x.npy", load_data("digits").take(slice(0, 40)).numpy())
    args = ["distance", str(tmp_path / "x.npy"), "--data", str(tmp_path / "x.npy")]
    code, _, err = run_cli([*args, "--metric", "fd", "--features", features, "--quiet"], capsys)
    assert code == 2, err
    assert err.startswith("latentdist: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_missing_or_wrong_weight_files_are_one_line_and_exit_2(tmp_path, capsys):
    """Missing file, random bytes, a pickled object (never unpickled), a state dict of another
    network: one line, exit 2, for both names."""
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
    torch.save({"cls_token": object()}, tmp_path / "pickled.pth")
    for name in ("dinov2", "inception"):
        assert "no such weights file" in _bad(capsys, tmp_path, f"{name}:{tmp_path / 'nope.pth'}")
        assert "unpickling" in _bad(capsys, tmp_path, f"{name}:{tmp_path / 'noise.pth'}")
        assert "unpickling" in _bad(capsys, tmp_path, f"{name}:{tmp_path / 'pickled.pth'}")
    assert "expected dinov2:PATH" in _bad(capsys, tmp_path, "dinov2:")
    err = _bad(capsys, tmp_path, f"dinov2:{tmp_path / 'linear.pth'}")
    assert "not a DINOv2" in err or "transformers" in err
    err = _bad(capsys, tmp_path, f"inception:{tmp_path / 'linear.pth'}")
    assert "not pytorch-fid's FID Inception" in err or "pytorch_fid" in err


def test_each_row_passes_the_network_once(tmp_path):
    """Seeds re-split the same rows: features of rows seen before come from the cache, equal
    to a fresh pass, and only new rows reach the network."""
    _random_dinov2(tmp_path / "hub.pth")
    net = load_pretrained("dinov2", tmp_path / "hub.pth")
    x = load_data("digits").take(slice(0, 10))
    seen = []
    inner = net.features
    net.features = lambda t: (seen.append(len(t)), inner(t))[1]
    with torch.no_grad():
        first = net(x[:6])
        again = net(x[[5, 0, 7, 8, 2]])
        fresh = inner(x[[5, 0, 7, 8, 2]])
    assert seen == [6, 2]
    assert torch.equal(again[[0, 1, 4]], first[[5, 0, 2]])
    assert float((again - fresh).abs().max()) <= 1e-6 * float(fresh.abs().max())


def test_images_outside_minus_one_one_are_refused(tmp_path):
    _random_dinov2(tmp_path / "hub.pth")
    net = load_pretrained("dinov2", tmp_path / "hub.pth")
    with pytest.raises(Exception, match=r"\[-1, 1\]"):
        net(torch.full((2, 1, 8, 8), 16.0))


def _random_fid_inception(path) -> None:
    """pytorch-fid's FID Inception architecture with random weights, saved as a state dict
    (the FID blocks change torchvision's forward, not its parameters)."""
    torchvision = _importable("torchvision")
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=True
    )
    torch.save(net.state_dict(), path)


def test_fd_inception_equals_pytorch_fid_on_an_image_folder(tmp_path, capsys):
    """pytorch-fid's own pipeline (``get_activations`` on the files, ``calculate_frechet_
    distance``) and latentdist's ``inception:PATH`` agree on features and FD."""
    fid_score = _importable("pytorch_fid.fid_score")
    inception = _importable("pytorch_fid.inception")
    _random_fid_inception(tmp_path / "pt_inception.pth")
    smp_paths = _rgb_folder(tmp_path / "smp", 2, 40, 1, size=64)  # the full Inception: few
    ref_paths = _rgb_folder(tmp_path / "ref", 4, 0, 2, size=64)
    state = torch.load(tmp_path / "pt_inception.pth", weights_only=True)
    from unittest import mock

    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state):
        model = inception.InceptionV3([3]).eval()
    act_ref = fid_score.get_activations(ref_paths, model, batch_size=4, dims=2048, num_workers=0)
    act_smp = fid_score.get_activations(smp_paths, model, batch_size=2, dims=2048, num_workers=0)
    net = load_pretrained("inception", tmp_path / "pt_inception.pth")
    with torch.no_grad():
        ours = net(load_data(tmp_path / "ref").take()).double().numpy()
    assert np.abs(ours - act_ref).max() <= 1e-5 * np.abs(act_ref).max()
    feats = f"inception:{tmp_path / 'pt_inception.pth'}"
    r = _cli_fd(capsys, str(tmp_path / "smp"), str(tmp_path / "ref"), feats, 2)
    assert r["features"] == "inception" and "Inception" in r["space"]
    for i, s in enumerate(r["seeds"]):
        sp = distance_split(4, 2, 2, s, fit=None)
        direct = _numpy_fd(act_smp[sp.smp_eval], act_ref[sp.ref_eval])  # 2 rows: singular
        assert r["distance"]["per_seed"][i] == pytest.approx(direct, rel=1e-4)
