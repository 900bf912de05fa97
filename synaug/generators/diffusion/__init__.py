"""Class-conditional DDPM: `network` (the UNet and sampling), `module` (training for `synaug fit`)."""
