"""The codecs `compress.*` configures: built from a run configuration, and checked whenever a
configuration is built (registered with `fedtune.config.register_check`)."""

from __future__ import annotations

from fedtune.compression.codecs import CodecError, CodecSpec, parse_spec
from fedtune.config import ConfigError, RunConfig, register_check


def codec_specs(config: RunConfig) -> tuple[CodecSpec, CodecSpec]:
    """(downlink, uplink) CodecSpecs of `compress.*`.

    Raises:
        ConfigError: a spec that cannot be built, naming its key.
    """
    c = config.compress
    specs = []
    for direction, text in (("downlink", c.downlink), ("uplink", c.uplink)):
        try:
            specs.append(
                parse_spec(
                    text,
                    block_size=c.block_size,
                    stochastic=c.stochastic_rounding,
                    error_feedback=c.error_feedback and direction == "uplink",
                    direction=direction,
                )
            )
        except CodecError as exc:
            name = (
                "compress.error-feedback"
                if "error feedback" in str(exc)
                else f"compress.{direction}"
            )
            raise ConfigError(f"{name}: {exc}") from None
    return specs[0], specs[1]


@register_check
def check_codecs(config: RunConfig) -> None:
    """Every configuration's codec specs must build."""
    codec_specs(config)
