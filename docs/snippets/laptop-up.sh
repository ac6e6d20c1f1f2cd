abq kafka up                                               # a local broker on 127.0.0.1:9092
abq experiment apply examples/laptop.yaml --create-topics  # the laptop experiment, live
abq worker --config examples/laptop.yaml --variant base --follow > base.log 2>&1 &
abq worker --config examples/laptop.yaml --variant candidate --follow > candidate.log 2>&1 &
