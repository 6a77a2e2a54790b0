"""`python -m speechjax.projects.spoken_commands`: runs every stage of the demo (see main.py)."""

from absl import app, flags

from speechjax.projects.spoken_commands import main

if __name__ == "__main__":
  main.define_flags()
  flags.adopt_module_key_flags(main)  # --help lists the demo's flags
  app.run(main.main)
