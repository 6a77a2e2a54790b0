"""Projects built on the speechjax library, one folder each (as big_vision's `proj/`).

A project may import the library; the library never imports a project. Each
project folder has a README saying what it does and how to run it.

    spoken_commands/   the offline CPU demo: a synthetic spoken-command corpus, a
                       text-pretrained LM, a CTC-pretrained encoder, the speech LLM
"""
