"""The book's NumPy classes (Deep Learning from Scratch, chapters 2-4), as an independent oracle.

Written the book's way: mutable objects, hand-written forward/backward, Python loops. Two
changes, both so a test can drive it: ``Dense`` takes its initial W and B, and ``Trainer``
takes a function that gives each epoch's row order (the book calls np.random.permutation).
Everything else, including the early-stopping rule (a deepcopy of the model taken at the
start of each evaluation epoch), is the book's.
"""

from copy import deepcopy

import numpy as np


class Operation:
    def forward(self, input_):
        self.input_ = input_
        self.output = self._output()
        return self.output

    def backward(self, output_grad):
        assert output_grad.shape == self.output.shape
        self.input_grad = self._input_grad(output_grad)
        return self.input_grad


class ParamOperation(Operation):
    def __init__(self, param):
        self.param = param

    def backward(self, output_grad):
        self.input_grad = self._input_grad(output_grad)
        self.param_grad = self._param_grad(output_grad)
        return self.input_grad


class WeightMultiply(ParamOperation):
    def _output(self):
        return self.input_ @ self.param

    def _input_grad(self, output_grad):
        return output_grad @ self.param.T

    def _param_grad(self, output_grad):
        return self.input_.T @ output_grad


class BiasAdd(ParamOperation):
    def _output(self):
        return self.input_ + self.param

    def _input_grad(self, output_grad):
        return np.ones_like(self.input_) * output_grad

    def _param_grad(self, output_grad):
        return np.sum(np.ones_like(self.param) * output_grad, axis=0).reshape(1, -1)


class Sigmoid(Operation):
    def _output(self):
        return 1.0 / (1.0 + np.exp(-self.input_))

    def _input_grad(self, output_grad):
        return self.output * (1.0 - self.output) * output_grad


class Tanh(Operation):
    def _output(self):
        return np.tanh(self.input_)

    def _input_grad(self, output_grad):
        return output_grad * (1 - self.output * self.output)


class Linear(Operation):
    def _output(self):
        return self.input_

    def _input_grad(self, output_grad):
        return output_grad


class Dense:
    def __init__(self, W, B, activation):
        self.params = [W.copy(), B.copy()]
        self.operations = [WeightMultiply(self.params[0]), BiasAdd(self.params[1]), activation]

    def forward(self, input_):
        for operation in self.operations:
            input_ = operation.forward(input_)
        return input_

    def backward(self, output_grad):
        for operation in reversed(self.operations):
            output_grad = operation.backward(output_grad)
        self.param_grads = [op.param_grad for op in self.operations if isinstance(op, ParamOperation)]
        return output_grad


class MeanSquaredError:
    def forward(self, prediction, target):
        self.prediction, self.target = prediction, target
        return np.sum(np.power(prediction - target, 2)) / prediction.shape[0]

    def backward(self):
        return 2.0 * (self.prediction - self.target) / self.prediction.shape[0]


class SoftmaxCrossEntropy:
    """The book's gradient, paired with the categorical loss value it belongs to."""

    def forward(self, prediction, target):
        self.target = target
        shifted = prediction - prediction.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self.softmax = np.exp(log_probs)
        return -np.sum(target * log_probs) / prediction.shape[0]

    def backward(self):
        return (self.softmax - self.target) / self.softmax.shape[0]


class NeuralNetwork:
    def __init__(self, layers, loss):
        self.layers, self.loss = layers, loss

    def forward(self, x_batch):
        for layer in self.layers:
            x_batch = layer.forward(x_batch)
        return x_batch

    def backward(self, loss_grad):
        for layer in reversed(self.layers):
            loss_grad = layer.backward(loss_grad)

    def train_batch(self, x_batch, y_batch):
        loss = self.loss.forward(self.forward(x_batch), y_batch)
        self.backward(self.loss.backward())
        return loss

    def params(self):
        for layer in self.layers:
            yield from layer.params

    def param_grads(self):
        for layer in self.layers:
            yield from layer.param_grads


class Optimizer:
    def __init__(self, lr=0.01, final_lr=0, decay_type=None):
        self.lr, self.final_lr, self.decay_type, self.first = lr, final_lr, decay_type, True

    def _setup_decay(self):
        if self.decay_type == "exponential":
            self.decay_per_epoch = np.power(self.final_lr / self.lr, 1.0 / (self.max_epochs - 1))
        elif self.decay_type == "linear":
            self.decay_per_epoch = (self.lr - self.final_lr) / (self.max_epochs - 1)

    def _decay_lr(self):
        if self.decay_type == "exponential":
            self.lr *= self.decay_per_epoch
        elif self.decay_type == "linear":
            self.lr -= self.decay_per_epoch

    def step(self):
        if self.first:
            self.velocities = [np.zeros_like(p) for p in self.net.params()]
            self.first = False
        for i, (param, grad) in enumerate(zip(self.net.params(), self.net.param_grads(), strict=True)):
            self._update_rule(param, grad, i)


class SGD(Optimizer):
    def _update_rule(self, param, grad, i):
        param -= self.lr * grad


class SGDMomentum(Optimizer):
    def __init__(self, lr=0.01, final_lr=0, decay_type=None, momentum=0.9):
        super().__init__(lr, final_lr, decay_type)
        self.momentum = momentum

    def _update_rule(self, param, grad, i):
        velocity = self.velocities[i]
        velocity *= self.momentum
        velocity += self.lr * grad
        param -= velocity


class Trainer:
    def __init__(self, net, optim, order):
        self.net, self.optim, self.order = net, optim, order
        self.optim.net = net
        self.best_loss = 1e9

    def fit(self, x_train, y_train, x_test, y_test, epochs=100, eval_every=10, batch_size=32):
        self.optim.max_epochs = epochs
        self.optim._setup_decay()
        self.stopped_epoch = epochs
        for e in range(epochs):
            if (e + 1) % eval_every == 0:
                last_model = deepcopy(self.net)
            perm = self.order(e)
            x, y = x_train[perm], y_train[perm]
            for i in range(0, x.shape[0], batch_size):
                self.net.train_batch(x[i : i + batch_size], y[i : i + batch_size])
                self.optim.step()
            if x_test is not None and (e + 1) % eval_every == 0:
                loss = self.net.loss.forward(self.net.forward(x_test), y_test)
                if loss < self.best_loss:
                    self.best_loss = loss
                else:
                    self.net = last_model
                    self.optim.net = self.net
                    self.stopped_epoch = e + 1
                    break
            if self.optim.final_lr:
                self.optim._decay_lr()
        return self
