"""Model output shapes, parameter counts and batch-norm state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from imgclf_jax import config_lib, models, pooling, recipes


def _init(model, size):
    return model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False)


@pytest.mark.slow
@pytest.mark.parametrize("num_outputs, expected", [(5, 3_989_285), (1, 3_988_769)])
def test_tutorial_cnn_matches_the_keras_tutorial_parameter_count(num_outputs, expected):
    # Keras's tutorial prints 3,989,285 parameters for this network with 5 classes at 180x180.
    variables = _init(models.TutorialCNN(num_outputs), 180)
    assert models.count_params(variables["params"]) == expected
    assert "batch_stats" not in variables


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("num_outputs", [1, 4])
def test_every_model_gives_one_logit_row_per_image(name, num_outputs):
    config = config_lib.base_config()
    config.model = name
    model = models.create_model(config, num_outputs)
    variables = _init(model, 32)
    logits = model.apply(variables, jnp.ones((3, 32, 32, 3)), train=False)
    assert logits.shape == (3, num_outputs)
    assert jnp.all(jnp.isfinite(logits))


@pytest.mark.slow
def test_cnn_options_change_the_network():
    plain = models.CNN(2, filters=(8, 16), dense_units=32)
    bn = models.CNN(2, filters=(8, 16), dense_units=32, batch_norm=True, convs_per_block=2, global_pool=True)
    plain_vars, bn_vars = _init(plain, 16), _init(bn, 16)
    # plain: conv 3*3*3*8+8, conv 3*3*8*16+16, dense (4*4*16)*32+32, out 32*2+2
    assert models.count_params(plain_vars["params"]) == 224 + 1168 + 8224 + 66
    assert "batch_stats" in bn_vars and "batch_stats" not in plain_vars


@pytest.mark.slow
def test_resnet_updates_batch_stats_in_training_and_uses_dropout_rng():
    model = models.ResNet(3, stage_sizes=(1, 1), widths=(8, 16), dropout=0.5)
    variables = _init(model, 16)
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(2)})
    assert logits.shape == (4, 3)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                                     updates["batch_stats"])
    assert any(jax.tree_util.tree_leaves(changed))


def test_unknown_model_is_a_user_error():
    from imgclf_jax.errors import UserError

    config = config_lib.base_config()
    config.model = "vgg99"
    with pytest.raises(UserError, match="unknown model 'vgg99'"):
        models.create_model(config, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_computes_in_bfloat16_with_float32_parameters(name):
    config = config_lib.base_config()
    config.model, config.dtype = name, "bfloat16"
    model = models.create_model(config, 3)
    variables = _init(model, 32)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    logits = model.apply(variables, x, train=False)
    assert logits.dtype == jnp.float32
    bf16_ops = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)).count("bf16[")
    assert bf16_ops > 0
    config.dtype = "float32"
    reference = models.create_model(config, 3).apply(variables, x, train=False)
    # The same function up to bfloat16 rounding (8 bits of mantissa), not identical.
    assert jnp.allclose(logits, reference, atol=0.1, rtol=0.1) and not jnp.array_equal(logits, reference)


def test_unknown_dtype_is_a_user_error():
    from imgclf_jax.errors import UserError

    config = config_lib.base_config()
    config.dtype = "float16"
    with pytest.raises(UserError, match="unknown dtype 'float16'"):
        models.create_model(config, 2)


def test_fused_cnn_blocks_keep_the_parameters_of_separate_layers():
    # The fused [conv, ReLU, pool] module must keep nn.Conv's names and initial values: checkpoints written
    # before it (and runs with other conv_impls) load and start the same.
    class SeparateLayers(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            for filters in (16, 32, 64):
                x = pooling.max_pool(nn.relu(nn.Conv(filters, (3, 3), padding="SAME")(x)), (2, 2))
            x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
            return nn.Dense(2)(x)

    fused, separate = _init(models.TutorialCNN(2), 32), _init(SeparateLayers(), 32)
    assert jax.tree_util.tree_structure(fused) == jax.tree_util.tree_structure(separate)
    assert all(bool(jnp.array_equal(a, b)) for a, b in
               zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(separate)))
    names = set(_init(models.CNN(2, filters=(8, 16), convs_per_block=2), 16)["params"])
    assert names == {"Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1"}


@pytest.mark.slow
def test_resnet_avg_pool_shortcut_reads_every_input_position_with_the_same_parameters():
    # The stride-2 1x1 shortcut reads only even rows and columns; ResNet-D's averages each 2x2 window first.
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    odd_only = jnp.zeros_like(x).at[:, 1::2, 1::2, :].set(1.0)
    outputs, counts = {}, {}
    for avg_pool_shortcut in (False, True):
        block = models.ResidualBlock(8, strides=2, avg_pool_shortcut=avg_pool_shortcut)
        variables = block.init(jax.random.key(0), x, train=False)
        counts[avg_pool_shortcut] = models.count_params(variables["params"])
        # The block starts as its shortcut (the residual branch's last scale is zero): changing only the
        # positions a stride-2 conv skips moves the output only through the pooled shortcut.
        outputs[avg_pool_shortcut] = [block.apply(variables, v, train=False) for v in (x, x + odd_only)]
    assert counts[False] == counts[True]
    assert jnp.array_equal(*outputs[False])
    assert not jnp.allclose(*outputs[True])
    config = recipes.load_config_file("cats_vs_dogs")
    assert models.create_model(config, 1).avg_pool_shortcut


@pytest.mark.slow
def test_drop_path_skips_the_residual_branch_for_whole_photos_in_training_only():
    x = jax.random.normal(jax.random.key(1), (16, 6, 6, 4))
    block = models.ResidualBlock(4, drop_path=0.5)
    variables = block.init(jax.random.key(0), x, train=False)
    # Give the residual branch a non-zero output (its last batch-norm scale starts at zero).
    variables["params"]["BatchNorm_1"]["scale"] = jnp.ones((4,))
    _, state = block.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True, rngs={"dropout": jax.random.key(3)})
    branch = state["intermediates"]["BatchNorm_1"]["__call__"][0]
    dropped = state["intermediates"]["Dropout_0"]["__call__"][0]
    # Each photo's branch is either dropped whole or kept whole, scaled by 1 / (1 - 0.5).
    skipped = [bool(jnp.all(d == 0)) for d in dropped]
    for d, b, s in zip(dropped, branch, skipped):
        assert s or jnp.allclose(d, 2 * b, rtol=1e-6)
    assert 0 < sum(skipped) < len(skipped)
    # Evaluation keeps every branch unscaled: the same as without stochastic depth.
    without = models.ResidualBlock(4).apply(variables, x, train=False)
    assert jnp.allclose(block.apply(variables, x, train=False), without)
    config = recipes.load_config_file("default")
    config.resnet.drop_path = 0.1
    assert models.create_model(config, 1).drop_path == 0.1


def test_resnet_silu_activation_changes_the_function_not_the_parameters():
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    relu_net = models.ResNet(2, stage_sizes=(1, 1), widths=(8, 16))
    silu_net = models.ResNet(2, stage_sizes=(1, 1), widths=(8, 16), act=nn.silu)
    variables = _init(relu_net, 16)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(_init(silu_net, 16))
    assert not jnp.allclose(relu_net.apply(variables, x), silu_net.apply(variables, x))
    config = recipes.load_config_file("default")
    config.resnet.activation = "silu"
    assert models.create_model(config, 1).act is nn.silu
    assert set(models.ACTIVATIONS) == set(config_lib.RESNET_ACTIVATIONS)  # Every name validate accepts builds.


def test_resnet_stem_pool_halves_the_blocks_resolution_with_the_same_parameters():
    x = jnp.ones((1, 32, 32, 3))
    sizes, counts = {}, {}
    for stem_pool in (False, True):
        model = models.ResNet(2, stage_sizes=(1, 1), widths=(8, 16), stem_pool=stem_pool)
        variables = _init(model, 32)
        _, state = model.apply(variables, x, train=False, capture_intermediates=True)
        sizes[stem_pool] = state["intermediates"]["ResidualBlock_0"]["__call__"][0].shape[1]
        counts[stem_pool] = models.count_params(variables["params"])
    assert sizes == {False: 16, True: 8}
    assert counts[False] == counts[True]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["keras", "torch"])
@pytest.mark.parametrize("recipe, num_classes", [("default", 2), ("default", 5), ("tutorial_cnn", 3)])
def test_the_benchmarks_keras_and_pytorch_twins_have_our_parameters(framework, recipe, num_classes, monkeypatch):
    pytest.importorskip(framework, reason=f"{framework} is a yardstick of scripts/benchmark.py, not a dependency")
    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import framework_twins

    config = recipes.load_config_file(recipe)
    config.image_size = 96
    ours = models.count_params(_init(models.create_model(config, 1 if num_classes == 2 else num_classes), 96)["params"])
    if framework == "keras":
        theirs = framework_twins.keras_param_count(config, num_classes)
    else:
        theirs = framework_twins.torch_param_count(config, num_classes)
    assert theirs == ours
