"""Built-in federated algorithms, each registered as ``@registry.load('fl_algo', name)``: fed_avg, fed_prox."""
