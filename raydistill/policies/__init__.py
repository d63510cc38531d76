"""What a failure means for a run: small policies that read what happened and return a ``Decision``, which the loop
carries out in one place (runtime/loop.py ``Run.carry_out``); Ray Train's failure-policy shape. Pure: no Ray, no
I/O, so every runtime, and a resumed run, takes the same decisions.

- ``health``: a non-finite loss, an unhealthy validation consistency (``train.health``);
- ``lost_worker``: a worker that died or hangs (restart while Ray will, else stop);
- ``peer_change``: a changed peer set on its trial epoch (undo it if it fails).
"""
