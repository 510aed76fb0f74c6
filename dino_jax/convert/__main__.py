from dino_jax.convert.cli import main

main()
