"""Values the data side and the model side must agree on, kept in one leaf
module that imports nothing, so neither side imports the other for them."""

# The token id a prompt carries at each audio slot; the speech LLM replaces
# these slots, in order, with projected audio frames. Negative, so it can
# never collide with a real vocabulary id.
AUDIO_PLACEHOLDER_ID = -1

# Where the audio goes inside an instruction text.
AUDIO_PLACEHOLDER = "<audio>"
