"""A drawn world of coloured shapes that the embedded tiny model is trained on."""
