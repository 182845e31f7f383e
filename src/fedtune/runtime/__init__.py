"""Running fedtune's Flower apps as processes: `fedtune run` (the simulation engine under a
supervisor), a local deployment (SuperLink, SuperNodes, certificates, node workers) and Flower's
managed local SuperLink. The algorithm these processes run is `fedtune.federation`."""
