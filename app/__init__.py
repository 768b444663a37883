"""The web app (``python -m app``) and the file CLI (``python -m app.cli``).

Both run on the onnxruntime engine (`vqwavenet.codec.Codec`) through `app.service`, which holds
every check the two share, so a bad input gets the same message in the browser and on stderr.
Nothing here imports torch.
"""
