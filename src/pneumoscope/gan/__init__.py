"""ACGAN augmentation: train a class-conditional GAN, sample synthetic images, evaluate them.

* :mod:`pneumoscope.gan.acgan`: the generator and the spectral-normalised discriminator with a class head.
* :mod:`pneumoscope.gan.train`: ``pneumoscope gan train`` (resumable, deterministic on CPU).
* :mod:`pneumoscope.gan.sample`: ``pneumoscope gan sample`` (PNG files + a dataset CSV).
* :mod:`pneumoscope.gan.evaluate`: ``pneumoscope gan evaluate`` (discriminator as classifier, Fréchet distance).

The synthetic images enter classifier training through the run config's ``data.synthetic`` option
(train split only); see ``docs/gan.md`` for the with/without comparison recipe.
"""
