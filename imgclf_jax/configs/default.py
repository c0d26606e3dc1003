"""Default recipe for a folder of photos (used when only --data_dir is given): a narrow ResNet on photos kept
at 160 px (or at the photos' own size where they are smaller), with a 2x2 max-pool after its stem (as
ImageNet ResNets do) so that its blocks cost what they cost at 80 px, ResNet-D shortcuts and SiLU, flip /
random-resized-crop / colour augmentation and one TrivialAugment op per photo (for folders of up to 400
photos a class), AdamW with warmup + cosine decay, a moving average of the weights, progressive resizing
(96 -> 160 px in four stages), the last epoch kept, and predictions averaged with the mirror image's (flip
test-time augmentation). It trains as many epochs as fit in a time budget that grows with the data, and
stops early when validation stops improving.

Chosen by measured runs on a 2-core CPU (docs/accuracy.md): at a fixed time budget, more epochs at a
moderate resolution beat fewer at a higher one, a narrow network beat a wider one, cheap low-resolution
epochs first bought the most of all, and dropout, label smoothing and MixUp/CutMix cost more accuracy than
they bought. The recipe suite (scripts/recipe_suite.py, docs/accuracy.md) scores it against the Keras
tutorial on photo folders of 2-5 classes and 60-700 photos a class, some held out of every choice.
"""

from imgclf_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.name = "default"
    config.image_size = 160
    config.augment.enabled = True
    config.augment.flip = True
    config.augment.crop_area_min = 0.5
    config.augment.brightness = 0.1
    config.augment.contrast = 0.1
    # One random TrivialAugment op per photo: -0.008 to +0.085 test accuracy on seven folders of 60-840 photos a
    # class, +0.019 on average, +0.027 on the four held out of every choice (docs/accuracy.md, series 34).
    config.augment.trivial_augment = True
    # But not for folders of more than 400 training photos a class (after the validation hold-out): with 800 a
    # class, 0.859 with it and 0.901 without in the same 12-minute budget (114 and 136 epochs; e167); with 553,
    # 0.723 and 0.731 (series 34); on six folders of 48-240 a class, +0.023 on average (docs/accuracy.md).
    config.augment.trivial_augment_max_photos_per_class = 400
    config.model = "resnet"
    config.resnet.stage_sizes = (1, 1, 1, 1)
    config.resnet.widths = (24, 48, 96, 192)
    config.resnet.stem_pool = True
    # A 2x2 average pool before each downsampling shortcut's 1x1 conv: 0.914 / 0.910 against 0.900 / 0.912
    # best validation accuracy for two seeds at 200 epochs on cats vs dogs (e124a/b against e106/e107).
    config.resnet.avg_pool_shortcut = True
    # SiLU: +0.010 best validation accuracy on three seeds at 200 epochs on cats vs dogs (e137a/b, e138a).
    config.resnet.activation = "silu"
    config.resnet.dropout = 0.0
    config.label_smoothing = 0.0
    config.progressive.start_scale = 0.6  # 96, 120, 136 then 160 px.
    config.progressive.stages = 4
    config.ema_decay = 0.998
    # evaluate and predict average each photo's prediction with its mirror image's (docs/accuracy.md: +0.004
    # accuracy on average over six runs of this recipe, +0.008 on four small folders' test photos, -0.007 and
    # -0.002 on flowers5's validation photos). Training validates on the photo alone. Needs the flip above.
    config.tta = "flip"
    # As many epochs as fit in a time budget that grows with the data (at most 200, a multiple of the 4
    # stages): a few minutes for a few hundred photos, 20 for a few thousand, on a 2-core CPU.
    config.epochs = 200
    config.auto_time_budget.seconds_per_image = 0.45
    config.auto_time_budget.min_minutes = 5.0
    config.auto_time_budget.max_minutes = 20.0
    config.early_stopping_share = 0.25
    # The run keeps its last epoch, not the best one by validation: with a few dozen validation photos a class
    # the best is partly chance and sometimes an early epoch (epoch 33 of 89: 0.613 against the last's 0.648 on
    # test photos). On twenty runs' test photos the last scored +0.007 on average (12 up, 3 down, 5 the same
    # epoch): +0.013 on the tuning folders, a tie (+0.001) on ten runs of held-out ones (docs/accuracy.md, e171,
    # e172). Its validation accuracy is then a fair estimate, not the luckiest of many.
    config.keep_epoch = "last"
    config.validate_every = 11  # And every epoch of the last stage, which early stopping watches.
    config.image_size_from_photos = True
    config.batch_size = 32
    config.learning_rate = 3e-3
    # Four times the weight decay of shorter runs (e53-e65): accuracy then keeps rising with the epochs (e74-e80).
    config.weight_decay = 0.2
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    return config
