"""Targets: devices the machine may not have (an H100's peak FLOP/s and bandwidth, a cost
per op: ``devices``) and the kernels they would run where a meta or CPU run takes another
(flash attention, one-byte dropout masks: ``kernels``)."""
