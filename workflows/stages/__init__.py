"""`kd run`'s stages, one module each, called in this order by workflows.pipeline (and singly by
workflows.commands and the benchmarks):

    inputs → teachers → soft_labels → chain → search → student → ship

A stage imports only the layer under the stages, never another stage:
    fit            a nested MLflow run, one fit with the run's Train workers, fits side by side
    training_data  the datasets a model trains on and its Loop over them
    store_pass     one precompute pass of teachers' logits into the store, and its teacher-seconds
    target         real input rows and latency measured on deploy.target
"""
