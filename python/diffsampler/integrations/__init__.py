"""Drop-ins for other libraries: diffusers schedulers (diffusers.py), k-diffusion samplers (kdiffusion.py)."""
