import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgclf_jax import mixing


def _two_tone_batch(n=4, size=16):
    """Image i is filled with the value i + 1, so every pixel says which image it came from."""
    images = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None, None], (n, size, size, 3))
    return images, jnp.arange(n, dtype=jnp.int32)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_each_image_with_its_mirror(seed):
    images, labels = _two_tone_batch()
    out = mixing.mix_batch(jax.random.key(seed), images, labels, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0)
    lam = float(out.lam)
    assert 0.0 <= lam <= 1.0
    expected = lam * images + (1 - lam) * images[::-1]
    np.testing.assert_allclose(out.images, expected, rtol=1e-6)
    np.testing.assert_array_equal(out.labels, labels)
    np.testing.assert_array_equal(out.partner_labels, labels[::-1])


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_pastes_a_box_whose_area_matches_lam(seed):
    images, labels = _two_tone_batch()
    out = mixing.mix_batch(jax.random.key(seed), images, labels, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
    first = np.asarray(out.images[0, :, :, 0])
    assert set(np.unique(first)) <= {1.0, 4.0}  # Only image 0 and its partner, image 3; no blending.
    own_share = float(np.mean(first == 1.0))
    assert own_share == pytest.approx(float(out.lam), abs=1e-6)
    partner_rows, partner_cols = np.nonzero(first == 4.0)
    if partner_rows.size:  # The pasted region is one axis-aligned box.
        box = first[partner_rows.min():partner_rows.max() + 1, partner_cols.min():partner_cols.max() + 1]
        assert np.all(box == 4.0)
    # Every image gets the same box, from its own partner.
    np.testing.assert_array_equal(out.images[1, :, :, 0] == 3.0, first == 4.0)


def test_both_kinds_alternate_and_are_reproducible():
    images, labels = _two_tone_batch()
    kinds = set()
    for seed in range(20):
        key = jax.random.key(seed)
        a = mixing.mix_batch(key, images, labels, mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0)
        b = mixing.mix_batch(key, images, labels, mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0)
        np.testing.assert_array_equal(a.images, b.images)
        values = set(np.unique(np.asarray(a.images[0])).tolist())
        kinds.add("cutmix" if values <= {1.0, 4.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_prob_zero_leaves_the_batch_alone():
    images, labels = _two_tone_batch()
    out = mixing.mix_batch(jax.random.key(0), images, labels, mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.0)
    np.testing.assert_array_equal(out.images, images)
    assert float(out.lam) == 1.0


def test_is_enabled():
    off = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0))
    assert not mixing.is_enabled(off)
    assert mixing.is_enabled(ml_collections.ConfigDict(dict(mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0)))
    assert not mixing.is_enabled(ml_collections.ConfigDict(dict(mixup_alpha=0.2, cutmix_alpha=0.0, prob=0.0)))
