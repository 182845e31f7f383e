"""Why fedtune does not run SecAgg+ with flwr 1.42 (docs/privacy.md), kept as checks: if
a Flower release lifts these limits, these tests fail and the paragraph must be revisited."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict

from fedtune.federation.messages import ARRAYS, METRICS

pytestmark = pytest.mark.unit


def test_secaggplus_workflow_needs_the_legacy_server_context():
    from flwr.server.workflow import SecAggPlusWorkflow

    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # fedtune's ServerApp is a Message-API `@app.main()` with a Grid and a plain Context.
    with pytest.raises(TypeError, match="Expect a LegacyContext"):
        workflow(None, context)


def test_secaggplus_client_mod_reads_only_the_legacy_fit_reply():
    from flwr.compat.common import recorddict_compat

    # A fedtune reply: the adapter under `arrays`, metrics under `metrics` (messages.py).
    reply = RecordDict(
        {
            ARRAYS: ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
            METRICS: MetricRecord({"num-examples": 40, "train-loss": 1.0}),
        }
    )
    # What secaggplus_mod does to a reply before masking it.
    with pytest.raises(KeyError, match="fitres.parameters"):
        recorddict_compat.recorddict_to_fitres(reply, keep_input=True)
