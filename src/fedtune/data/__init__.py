"""Instruction data for the clients: sources (a hub data set, a local file or the embedded sample),
partitioning exactly as the challenge's FederatedDataset does, the Alpaca prompt with response-only
labels, and the pipeline from `data.*` settings to one client's tokenized examples; also
`fedtune data report` and `fedtune data split`.

Public API:

- cli: `fedtune data report|split`
  - register: adds the `data` sub-commands to the `fedtune` parser
- partition: partitioning with flwr-datasets' partitioners
  - partition_dataset: the seeded shuffle, the held-out rows taken out, then the partitioner
- partition_report: what each client holds, and how far from IID
  - PartitionReport: partition sizes and label histograms per client
  - REPORT_JSON: the report's file name, `partitions.json`
  - build_report: the report for local or embedded data
  - describe: the report as one line of text
  - save: writes `partitions.json` and `partitions.png`
- pipeline: from `data.*` settings to one client's tokenized examples
  - heldout_examples: the tokenized held-out rows
  - node_file_examples: tokenized examples of a node's own data file
  - partition_examples: tokenized examples of one partition, with drop counts
  - sb_init_examples: the public examples that set the r×r adapter's frozen factors
- prompts: the challenge's Alpaca training prompt and response-only token masks
  - TokenizedExample: token ids and which of them are predicted
  - format_prompt: the prompt part, ending where the response begins
  - tokenize_rows: tokenizes cleaned rows, counting truncations
- sources: instruction data sources and their rows
  - DataError: data that cannot be found, parsed or used as configured
  - clean_rows: keeps rows with a non-empty instruction and output
  - load_local_rows: all rows of a local or embedded file, columns normalized
  - node_file: the file name of a partition's rows in a split directory
  - read_manifest: a split directory's `split.json`, checked
  - resolve_data: classifies `data.name` and checks what can be checked offline
"""

__all__: list[str] = ["cli", "partition", "partition_report", "pipeline", "prompts", "sources"]
