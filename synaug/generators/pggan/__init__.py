"""Progressive GAN: `network` (generator, critic, sampling), `module` (training for `synaug fit`)."""
