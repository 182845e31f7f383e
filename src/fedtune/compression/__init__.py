"""What crosses the wire: adapter message codecs per direction (see `codecs.py`).

A codec is a chain of stages written as a spec string such as `delta,top-k=0.05,int8,zstd`;
`message.py` applies a direction's codec to an adapter message (delta, error feedback, the
ArrayRecord).

Public API:

- codecs: codec specs, their stages, and encoding and decoding tensors
  - CodecError: a spec that cannot be built, or a payload that cannot be decoded
  - CodecSpec: one direction's codec
  - parse_spec: a CodecSpec from its spec string
- message: a direction's codec applied to an adapter message
  - MessageCodec: encodes an adapter into a message's ArrayRecord and decodes it back
- settings: the codecs `compress.*` configures, checked whenever a configuration is built
  - check_codecs: the configuration check (registered with fedtune.config)
  - codec_specs: the (downlink, uplink) codec specs of a configuration
"""

__all__: list[str] = ["codecs", "message", "settings"]
