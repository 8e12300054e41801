# maxwhisper's CPU kernels, loaded into a graph as MAX custom ops (builder.GraphOptions.kernels).
