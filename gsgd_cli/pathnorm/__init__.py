"""Path-SGD's math (Neyshabur et al., 2015): the squared-weight copy of a ReLU network
(`squared_copy`, with `pooling`'s squared-coefficient poolings) and the step as functions of
tensor lists (`step`)."""
