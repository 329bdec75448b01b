"""Small helpers at the bottom of the package, as diffusers keeps them in `diffusers.utils`: they import nothing from
the rest of `gill_pipeline` (only `constants`), and every module may import them."""
