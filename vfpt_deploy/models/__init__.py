"""The models: the VFPT configuration, the Fourier transform of the prompts, and one folder per backbone family
(vit/, swin/). Torch-free to import: `import vfpt_deploy` reads the config from here."""
