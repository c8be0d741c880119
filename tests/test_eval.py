"""soflow.eval: Fréchet distance, FID (against torch-fidelity), Inception Score, point-cloud metrics,
and the readers' one-line errors. Offline and CPU-only: the Inception weights are random."""

import numpy as np
import pytest
import torch
from PIL import Image

from soflow.eval import (EvalError, InceptionFeatures, energy_distance, fid_from_images, frechet_distance,
                         inception_score, load_images, load_stats, save_stats, sliced_wasserstein2, statistics,
                         stats_from_images)
from soflow.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and len(msg.splitlines()) == 1, msg
    return msg


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def smooth_images(rng, n, lo, hi, size=32, channels=3):
    """uint8 [n, C, size, size]: random 4x4 colour blocks, upsampled, plus pixel noise."""
    coarse = rng.uniform(lo, hi, size=(n, channels, 4, 4))
    x = np.kron(coarse, np.ones((1, 1, size // 4, size // 4))) + rng.normal(0, 8, (n, channels, size, size))
    return torch.from_numpy(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def pooled(images):
    """A cheap stand-in extractor: 4x4 average pooling -> [N, 3*4*4] float features."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_full_covariances_match_eigendecomposition():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # Tr((s1 s2)^1/2) = Tr((s1^1/2 s2 s1^1/2)^1/2), a symmetric PSD matrix: eigh only.
    r = sqrtm_psd(s1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    # float32 inputs are promoted: same answer.
    assert frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2) == pytest.approx(
        frechet_distance(mu1.astype(np.float32).astype(np.float64), s1.astype(np.float32).astype(np.float64), mu2, s2),
        rel=1e-12)


def test_frechet_distance_singular_covariances_are_finite():
    # Fewer samples than dimensions, as with small sample sets of 2048-D features.
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((20, 40)), rng.standard_normal((20, 40)) + 0.5
    mu_a, s_a = statistics(a)
    mu_b, s_b = statistics(b)
    scale = np.trace(s_a)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-6 * scale
    fd = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert np.isfinite(fd) and fd > 0.25 * 40


def test_frechet_distance_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Metrics on identical and shifted sets


def test_every_metric_is_zero_on_itself_and_grows_with_shift():
    rng = np.random.default_rng(3)
    images = smooth_images(rng, 200, 20, 180)
    assert fid_from_images(images, images, pooled) == pytest.approx(0.0, abs=1e-6)
    fids = [fid_from_images(images, (images.int() + s).clamp(0, 255).to(torch.uint8), pooled) for s in (8, 16, 32)]
    assert 0 < fids[0] < fids[1] < fids[2], fids

    x = torch.from_numpy(rng.standard_normal((300, 2)))
    assert energy_distance(x, x) == 0.0
    assert sliced_wasserstein2(x, x) == 0.0
    shifts = [torch.tensor([s, -s / 2]) for s in (0.25, 0.5, 1.0)]
    eds = [energy_distance(x, x + v) for v in shifts]
    sws = [sliced_wasserstein2(x, x + v) for v in shifts]
    assert 0 < eds[0] < eds[1] < eds[2], eds
    assert 0 < sws[0] < sws[1] < sws[2], sws


# ---------------------------------------------------------------------------------------------
# Point-cloud metrics


def test_energy_distance_matches_direct_sums():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((45, 3)) * 1.5 + 0.3

    def mean_dist(a, b):
        return np.mean([np.linalg.norm(p - q) for p in a for q in b])

    expected = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert energy_distance(torch.from_numpy(y).float(), x) == pytest.approx(expected, rel=1e-6)
    # Two point masses at distance r: 2r.
    assert energy_distance([[0.0, 0.0]], [[3.0, 4.0]]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(x, y[:, :2])


def test_sliced_wasserstein_exact_cases():
    # 1-D: every direction is +-1, so SW2 is the exact W2.
    x = np.array([3.0, -1.0, 0.5, 2.0])
    y = np.array([0.0, 1.0, -2.0, 4.0])
    assert sliced_wasserstein2(x, y) == pytest.approx(np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2)), rel=1e-12)
    assert sliced_wasserstein2(x, x + 0.7) == pytest.approx(0.7, rel=1e-12)
    # Different sizes: quantile functions {0 | 1} and {0 | .5 | 1} differ by .5 on (1/3, 2/3].
    assert sliced_wasserstein2([0.0, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(np.sqrt(1 / 12), rel=1e-12)
    # The same empirical distribution with repeated points is at distance 0.
    assert sliced_wasserstein2(x, np.repeat(x, 3)) == pytest.approx(0.0, abs=1e-12)
    # A translation by v in d dimensions: SW2^2 = mean_k (theta_k . v)^2 ~= |v|^2 / d.
    pts = np.random.default_rng(5).standard_normal((100, 3))
    v = np.array([1.0, 2.0, -2.0])
    sw = sliced_wasserstein2(pts, pts + v, num_projections=4000)
    assert sw**2 == pytest.approx(9.0 / 3, rel=0.1)
    # Deterministic in the seed.
    assert sliced_wasserstein2(pts, pts + v, seed=1) == sliced_wasserstein2(pts, pts + v, seed=1)


# ---------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_closed_forms():
    # Identical predictions: p(y|x) = p(y), IS = 1.
    mean, std = inception_score(torch.randn(1, 10).repeat(40, 1), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # Confident predictions spread evenly over k classes in every split: IS = k.
    k = 5
    logits = torch.full((50, 8), -1e4, dtype=torch.float64)
    logits[torch.arange(50), torch.arange(50) % k] = 0.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_torch_fidelity():
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = torch.randn(100, 30) * 3
    ours = inception_score(logits, splits=5)
    theirs = metric_isc.isc_features_to_metric(logits, splits=5, shuffle=False)
    assert ours[0] == pytest.approx(theirs[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-9)
    assert ours[1] == pytest.approx(theirs[metric_isc.KEY_METRIC_ISC_STD], rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Statistics files


def test_stats_roundtrip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = statistics(rng.standard_normal((50, 6)))
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    path = save_stats(tmp_path / "ref", mu, sigma)
    assert path.name == "ref.npz"
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # ADM's reference batches hold more arrays beside mu and sigma; those are ignored.
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    np.testing.assert_allclose(load_stats(adm)[0], mu, rtol=1e-6)
    # fid_from_images takes such a file as the reference.
    imgs = smooth_images(rng, 40, 0, 255)
    ref = save_stats(tmp_path / "pooled.npz", *stats_from_images(imgs, pooled))
    assert abs(fid_from_images(imgs, ref, pooled)) < 1e-6 * np.trace(load_stats(ref)[1])


def test_malformed_stats_files_are_one_line_errors(tmp_path):
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(3))
    with pytest.raises(EvalError) as e:
        load_stats(no_sigma)
    msg = one_line(e)
    assert str(no_sigma) in msg and "sigma" in msg

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive\n\nat all")
    with pytest.raises(EvalError) as e:
        load_stats(garbage)
    assert str(garbage) in one_line(e)

    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(EvalError) as e:
        load_stats(bad_shape)
    assert str(bad_shape) in one_line(e)

    with pytest.raises(EvalError) as e:
        load_stats(tmp_path / "missing.npz")
    assert "missing.npz" in one_line(e)


# ---------------------------------------------------------------------------------------------
# Reading samples


def test_load_images_folder_and_npz(tmp_path):
    rng = np.random.default_rng(7)
    imgs = smooth_images(rng, 5, 0, 255, size=16)
    folder = tmp_path / "samples"
    (folder / "b").mkdir(parents=True)
    (folder / "a").mkdir()
    names = ["a/000.png", "a/001.png", "b/000.png", "b/1.PNG", "c.png"]
    for name, img in zip(names, imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / name)
    (folder / "notes.txt").write_text("ignored")
    loaded = load_images(folder)
    assert loaded.dtype == torch.uint8 and loaded.shape == (5, 3, 16, 16)
    torch.testing.assert_close(loaded, imgs)  # sorted by relative path, PNG is lossless

    # A grayscale PNG becomes 3 equal channels.
    gray_dir = tmp_path / "gray"
    gray_dir.mkdir()
    Image.fromarray(imgs[0, 0].numpy()).save(gray_dir / "g.png")
    g = load_images(gray_dir)
    assert g.shape == (1, 3, 16, 16) and torch.equal(g[0, 1], imgs[0, 0]) and torch.equal(g[0, 2], imgs[0, 0])

    # ADM sample format: uint8 NHWC arr_0.
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=imgs.permute(0, 2, 3, 1).numpy())
    torch.testing.assert_close(load_images(npz), imgs)
    np.savez(tmp_path / "gray.npz", arr_0=imgs[:, :1].permute(0, 2, 3, 1).numpy())
    assert load_images(tmp_path / "gray.npz").shape == (5, 1, 16, 16)


def test_bad_image_inputs_are_one_line_errors(tmp_path):
    cases = {
        "float.npz": np.zeros((2, 8, 8, 3), np.float32),
        "nchw.npz": np.zeros((2, 3, 8, 8), np.uint8),
        "flat.npz": np.zeros((2, 8), np.uint8),
    }
    for name, arr in cases.items():
        np.savez(tmp_path / name, arr_0=arr)
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2), sigma=np.eye(2))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    for name in [*cases, "stats_only.npz", "broken.npz", "nothing_here.npz"]:
        with pytest.raises(EvalError) as e:
            load_images(tmp_path / name)
        assert name in one_line(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError) as e:
        load_images(empty)
    assert "empty" in one_line(e)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(corrupt / "0.png")
    (corrupt / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(EvalError) as e:
        load_images(corrupt)
    assert "1.png" in one_line(e)

    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sizes / "0.png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(sizes / "1.png")
    with pytest.raises(EvalError) as e:
        load_images(sizes)
    assert "1.png" in one_line(e)


# ---------------------------------------------------------------------------------------------
# Inception features


def test_missing_weights_is_one_line(tmp_path, monkeypatch):
    # Runs without torch-fidelity: the file is checked before it is imported.
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(missing, device="cpu")
    msg = one_line(e)
    assert str(missing) in msg and f".cache/soflow/{WEIGHTS_FILE}" in msg and WEIGHTS_ENV in msg

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "from_env.pth"))
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(device="cpu")
    assert "from_env.pth" in one_line(e)

    monkeypatch.delenv(WEIGHTS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(device="cpu")
    assert str(tmp_path / "home" / ".cache" / "soflow" / WEIGHTS_FILE) in one_line(e)


def test_fid_matches_torch_fidelity(tmp_path, random_inception_weights):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    rng = np.random.default_rng(8)
    n = 32
    dirs = []
    for name, (lo, hi) in {"a": (0, 170), "b": (60, 255)}.items():
        d = tmp_path / name
        d.mkdir()
        for i, img in enumerate(smooth_images(rng, n, lo, hi)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
        dirs.append(d)
    # The 64-channel layer (the stem of the network) keeps the test fast on a CPU and the
    # covariances small; the data path and the statistics are those of the 2048-D FID.
    layer = "64"
    ext = InceptionFeatures(random_inception_weights, device="cpu", batch_size=24, features=(layer,))
    ours = fid_from_images(dirs[0], dirs[1], ext)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(dirs[0]), input2=str(dirs[1]), fid=True, feature_layer_fid=layer,
        feature_extractor_weights_path=str(random_inception_weights), cuda=False, cache=False,
        verbose=False, save_cpu_ram=True)[torch_fidelity.KEY_METRIC_FID]
    print(f"FID ours {ours:.9g} torch-fidelity {theirs:.9g} rel {abs(ours - theirs) / theirs:.2e}")
    assert ours > 1.0  # the random network separates the two sets
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_inception_features_default_layers_and_grayscale(random_inception_weights):
    pytest.importorskip("torch_fidelity")
    rng = np.random.default_rng(9)
    rgb = smooth_images(rng, 2, 0, 255, size=24)
    # The whole network (pool features and logits) in one batch: slow on a CPU, so two images.
    ext = InceptionFeatures(random_inception_weights, device="cpu")
    out = ext.extract(rgb)
    assert out["2048"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    assert out["2048"].dtype == torch.float32 and torch.isfinite(out["2048"]).all()
    assert (out["2048"][0] - out["2048"][1]).abs().max() > 1e-3 * out["2048"].abs().max()
    mean, std = inception_score(out["logits_unbiased"], splits=1)
    assert mean > 1.0 and std == 0.0
    # Grayscale is repeated to 3 channels; batches of 2 give the same features as one call.
    gray = smooth_images(rng, 1, 0, 255, size=24, channels=1)
    stem = InceptionFeatures(random_inception_weights, device="cpu", batch_size=2, features=("64",))
    both = stem(torch.cat([rgb, gray.repeat(1, 3, 1, 1)]))
    assert both.shape == (3, 64)
    torch.testing.assert_close(stem(gray)[0], both[2])
    torch.testing.assert_close(stem(rgb[1:]), both[1:2])
    with pytest.raises(ValueError, match="uint8"):
        stem(rgb.float())


def test_unusable_weights_file_is_one_line(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(EvalError) as e:
        InceptionFeatures(bad, device="cpu")
    assert str(bad) in one_line(e)


# ---------------------------------------------------------------------------------------------
# Precision and recall


def brute_precision_recall(real, fake, ks):
    """Kynkäänniemi et al.'s definition, literally: explicit loops in float64, for each k in ks."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def dists(x, y):
        return [[float(np.sqrt(np.sum((a - b) ** 2))) for b in y] for a in x]

    d_rr, d_ff, d_fr = dists(real, real), dists(fake, fake), dists(fake, real)
    d_rf = [list(col) for col in zip(*d_fr)]
    out = {}
    for k in ks:
        r_real = [sorted(row[:i] + row[i + 1:])[k - 1] for i, row in enumerate(d_rr)]  # k-th neighbour, not itself
        r_fake = [sorted(row[:i] + row[i + 1:])[k - 1] for i, row in enumerate(d_ff)]
        precision = sum(any(d <= r for d, r in zip(row, r_real)) for row in d_fr) / len(fake)
        recall = sum(any(d <= r for d, r in zip(row, r_fake)) for row in d_rf) / len(real)
        out[k] = (precision, recall)
    return out


def test_precision_recall_matches_brute_force():
    from soflow.eval.fid import precision_recall

    rng = np.random.default_rng(12)
    real = rng.standard_normal((60, 8))
    fake = np.concatenate([rng.standard_normal((30, 8)) * 0.6 + 0.4, rng.standard_normal((15, 8)) * 2.0 + 1.5])
    brute = brute_precision_recall(real, fake, (1, 3, 5))
    for k, expected in brute.items():
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither side is trivial
        for batch_size in (7, 10000):  # blocks of rows give the same answer as one block
            got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch_size=batch_size)
            assert got == expected, (k, batch_size)


def test_precision_recall_closed_cases():
    from soflow.eval.fid import precision_recall

    rng = np.random.default_rng(13)
    real = rng.standard_normal((40, 16)).astype(np.float32)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    # The real points plus a far cluster: every real point is covered (recall 1), and exactly the
    # copies of real points among the samples are inside the real manifold.
    far = rng.standard_normal((10, 16)).astype(np.float32) + 1000.0
    assert precision_recall(real, np.concatenate([real, far])) == (40 / 50, 1.0)
    with pytest.raises(ValueError, match="k = 3"):
        precision_recall(real[:3], real)
    with pytest.raises(ValueError, match="dimensions"):
        precision_recall(real, real[:, :8])


# ---------------------------------------------------------------------------------------------
# Weights files and sFID's spatial features


def test_spatial_features_and_weights_formats(tmp_path, random_inception_weights):
    """The safetensors form of the weights, and torch-fidelity's own layout (no batch-norm step
    counters), give the same network; 'spatial' is ADM's mixed_6/conv[..., :7], computed here by
    running the network's blocks by hand."""
    pytest.importorskip("torch_fidelity")
    from safetensors.torch import save_file
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    state = torch.load(random_inception_weights, weights_only=True)
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "release.pth")
    x = smooth_images(np.random.default_rng(14), 2, 0, 255, size=24)
    ext = InceptionFeatures(tmp_path / "w.safetensors", device="cpu", features=("64", "spatial"))
    out = ext.extract(x)
    torch.testing.assert_close(out["64"], InceptionFeatures(tmp_path / "release.pth", device="cpu", features=("64",))(x))
    torch.testing.assert_close(out["64"], InceptionFeatures(random_inception_weights, device="cpu", features=("64",))(x))

    net = ext.net
    with torch.no_grad():
        h = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(net, name)(h)
        conv = net.Mixed_6d.branch1x1(h)  # TensorFlow's mixed_6/conv, after its ReLU
    assert conv.shape == (2, 192, 17, 17) and out["spatial"].shape == (2, 2023)
    torch.testing.assert_close(out["spatial"], conv[:, :7].permute(0, 2, 3, 1).reshape(2, 2023))
    assert out["spatial"][1, (5 * 17 + 3) * 7 + 6] == conv[1, 6, 5, 3]  # NHWC: (h, w, c), as ADM flattens

    bad = dict(state, **{"fc.weight": torch.zeros(3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EvalError) as e:
        InceptionFeatures(tmp_path / "bad.pth", device="cpu")
    assert "fc.weight" in one_line(e) and "bad.pth" in one_line(e)


def test_fid_cli_precision_recall_and_sfid(tmp_path, random_inception_weights):
    pytest.importorskip("torch_fidelity")
    import json

    from helpers import soflow_inproc
    from soflow.eval.fid import precision_recall
    from soflow.eval.run import fid_against_reference

    rng = np.random.default_rng(15)
    a, b = smooth_images(rng, 10, 0, 220, size=24), smooth_images(rng, 12, 20, 255, size=24)
    for name, imgs in (("a", a), ("b", b)):
        np.savez(tmp_path / f"{name}.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy())
    w = ["--inception-weights", random_inception_weights, "--dims", "64", "--device", "cpu"]
    ref = tmp_path / "ref.npz"
    soflow_inproc("fid", "ref", "--images", tmp_path / "b.npz", "--out", ref, "--prc", "--sfid", *w, check=True)
    z = np.load(ref)
    assert sorted(z.files) == ["features", "mu", "mu_s", "sigma", "sigma_s"]
    assert z["features"].shape == (12, 64) and z["features"].dtype == np.float32
    assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023) and np.trace(z["sigma_s"]) > 0
    np.testing.assert_allclose(z["mu"], z["features"].astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)

    out = tmp_path / "r.json"
    proc = soflow_inproc("fid", "calc", "--images", tmp_path / "a.npz", "--ref", ref, "--prc", "--sfid",
                         "--json", out, *w, check=True)
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    assert sorted(result) == ["fid", "num_images", "precision", "recall", "sfid"]
    assert result["sfid"] > 0 and result["fid"] > 0
    ext = InceptionFeatures(random_inception_weights, device="cpu", features=("64",))
    fa, fb = ext(a), ext(b)
    precision, recall = precision_recall(fb, fa)
    assert 0 < precision < 1 and 0 < recall < 1  # overlapping sets: neither value is trivial
    # Another process may round the convolutions differently: at most one sample may flip.
    assert abs(result["precision"] - precision) <= 1 / 10 and abs(result["recall"] - recall) <= 1 / 12

    # ADM's reference batches hold mu, sigma, mu_s, sigma_s and the reference images in arr_0, no
    # features: precision and recall then come from the features of those images.
    adm = tmp_path / "adm.npz"
    np.savez(adm, arr_0=b.permute(0, 2, 3, 1).numpy(), mu=z["mu"], sigma=z["sigma"])
    got = fid_against_reference(str(tmp_path / "a.npz"), adm, random_inception_weights, "cpu", dims="64", prc=True)
    assert (got["precision"], got["recall"]) == (precision, recall)

    # References that lack what is asked for fail, in one line, before any image is read.
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=z["mu"], sigma=z["sigma"])
    for flags, needle in ((dict(prc=True), "fid ref --prc"), (dict(sfid=True), "fid ref --sfid"),
                          (dict(dims="2048"), "--dims")):
        with pytest.raises(EvalError) as e:
            fid_against_reference(str(tmp_path / "a.npz"), plain, tmp_path / "no-weights.pth", "cpu",
                                  **{"dims": "64", **flags})
        assert str(plain) in one_line(e) and needle in one_line(e)
