"""TF-1 reference graphs of the RCN and LDR_ALDK networks, for the checkpoint-import tests.

Written here from the published architectures (variable scopes, names and shapes as tflearn makes
them: ``<stem>/<layer>/W`` ``(kx, ky, kz, in, out)`` and ``/b``; transposed convolutions
``(kx, ky, kz, out, in)`` without bias; "SAME" padding; LeakyReLU 0.1; Keras-style nearest x2
upsampling), in ``tf.compat.v1`` graph mode. Needs the ``tf-test`` extra (tensorflow-cpu).
Weights are random (He-normal kernels, N(0, 0.1) biases) so every layer matters in the comparison.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1
tf1.disable_eager_execution()
SCOPE = "gaffdfrm"


FLOW_LAYER_GAIN = {"gain": 1.0}     # scales the init of the layers that output a flow (see save_reference)


def _kernel(shape, fan_in, gain=1.0):
    return tf1.random_normal_initializer(0.0, gain * float(np.sqrt(2.0 / fan_in)))


def conv(name, x, cout, kernel, stride, bias=True, padding="SAME", gain=1.0):
    cin = int(x.shape[-1])
    ks = [kernel] * 3 if isinstance(kernel, int) else list(kernel)
    with tf1.variable_scope(name):
        W = tf1.get_variable("W", ks + [cin, cout], initializer=_kernel(None, cin * int(np.prod(ks)), gain))
        y = tf.nn.conv3d(x, W, [1, stride, stride, stride, 1], padding)
        if bias:
            y = y + tf1.get_variable("b", [cout], initializer=tf1.random_normal_initializer(0.0, 0.1))
    return y


def lrelu(x):
    return tf.maximum(x, 0.1 * x)


def conv_lrelu(name, x, cout, stride):
    return lrelu(conv(name, x, cout, 3, stride))


def upconv(name, x, cout, target, gain=1.0):
    """4^3 stride-2 transposed convolution, no bias, to ``target`` (spatial sizes)."""
    cin = int(x.shape[-1])
    with tf1.variable_scope(name):
        W = tf1.get_variable("W", [4, 4, 4, cout, cin], initializer=_kernel(None, cin * 8, gain))
        out_shape = tf.stack([tf.shape(x)[0]] + list(target) + [cout])
        y = tf.nn.conv3d_transpose(x, W, out_shape, [1, 2, 2, 2, 1], "SAME")
    return tf.reshape(y, [-1] + list(target) + [cout])


def up2(x):
    for axis in (1, 2, 3):
        x = tf.repeat(x, 2, axis=axis)
    return x


def spatial(x):
    return [int(s) for s in x.shape[1:4]]


def vtn(x, c, flow_multiplier):
    """RCN ``VTN``: encoder conv1..conv6_1, pred/upsamp/deconv decoder, x20 x multiplier."""
    layers = {}
    net = x
    for name, cout, stride in (("conv1", c, 2), ("conv2", 2 * c, 2), ("conv3", 4 * c, 2), ("conv3_1", 4 * c, 1),
                               ("conv4", 8 * c, 2), ("conv4_1", 8 * c, 1), ("conv5", 16 * c, 2),
                               ("conv5_1", 16 * c, 1), ("conv6", 32 * c, 2), ("conv6_1", 32 * c, 1)):
        net = conv_lrelu(name, net, cout, stride)
        layers[name] = net
    skips = {5: layers["conv5_1"], 4: layers["conv4_1"], 3: layers["conv3_1"], 2: layers["conv2"], 1: layers["conv1"]}
    net = layers["conv6_1"]
    for level in (6, 5, 4, 3, 2):
        skip = skips[level - 1]
        pred = conv(f"pred{level}", net, 3, 3, 1)
        upsamp = upconv(f"upsamp{level}to{level - 1}", pred, 3, spatial(skip))
        deconv = lrelu(upconv(f"deconv{level - 1}", net, int(skip.shape[-1]), spatial(skip)))
        net = tf.concat([skip, deconv, upsamp], 4)
    flow = upconv("upsamp1to0", net, 3, spatial(x), FLOW_LAYER_GAIN["gain"])
    return {"flow": flow * 20.0 * flow_multiplier}


def unet(x, encoders, decoders, flow_multiplier):
    """RCN ``VoxelMorph`` / LDR_ALDK ``LDR`` (with ``decode0_1``)."""
    c1 = conv_lrelu("conv1", x, encoders[0], 2)
    c2 = conv_lrelu("conv2", c1, encoders[1], 2)
    c3 = conv_lrelu("conv3", c2, encoders[2], 2)
    c4 = conv_lrelu("conv4", c3, encoders[3], 2)
    net = conv_lrelu("decode4", c4, decoders[0], 1)
    net = conv_lrelu("decode3", tf.concat([up2(net), c3], -1), decoders[1], 1)
    net = conv_lrelu("decode2", tf.concat([up2(net), c2], -1), decoders[2], 1)
    net = conv_lrelu("decode1", tf.concat([up2(net), c1], -1), decoders[3], 1)
    net = conv_lrelu("decode1_1", net, decoders[4], 1)
    net = conv_lrelu("decode0", tf.concat([up2(net), x], -1), decoders[5], 1)
    net = conv_lrelu("decode0_1", net, decoders[6], 1)
    return {"flow": conv("flow", net, 3, 3, 1, gain=FLOW_LAYER_GAIN["gain"]) * flow_multiplier}


def voxelmorph(x, c, flow_multiplier):
    return unet(x, [c, 2 * c, 2 * c, 2 * c], [2 * c] * 5 + [c, c], flow_multiplier)


def ldr(x, c, flow_multiplier):
    return unet(x, [2 * c, 2 * c, 2 * c, c], [2 * c] * 4 + [c, c, c], flow_multiplier)


def affine_head(features, size):
    ks = spatial(features)
    W = tf.reshape(conv("conv7_W", features, 9, ks, 1, bias=False, padding="VALID"), [-1, 3, 3])
    b = tf.reshape(conv("conv7_b", features, 3, ks, 1, bias=False, padding="VALID"), [-1, 3])
    axes = [tf.range(-(n - 1) / 2.0, n / 2.0, 1.0, tf.float32) for n in size]
    grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), -1)                       # (X, Y, Z, 3)
    flow = tf.einsum("xyzj,bij->bxyzi", grid, W) + tf.reshape(b, [-1, 1, 1, 1, 3])
    return {"flow": flow, "W": W, "b": b}


def vtn_affine(x):
    """RCN ``VTNAffineStem`` (widths fixed at 16..512)."""
    net = x
    for name, cout, stride in (("conv1", 16, 2), ("conv2", 32, 2), ("conv3", 64, 2), ("conv3_1", 64, 1),
                               ("conv4", 128, 2), ("conv4_1", 128, 1), ("conv5", 256, 2), ("conv5_1", 256, 1),
                               ("conv6", 512, 2), ("conv6_1", 512, 1)):
        net = conv_lrelu(name, net, cout, stride)
    return affine_head(net, spatial(x))


def ldr_affine(x):
    """LDR_ALDK ``LDRUtilStem``: convs 16..128 stride 2, 3^3 stride-2 valid average pooling, head."""
    net = x
    for k, cout in enumerate((16, 32, 64, 128)):
        net = conv_lrelu(f"conv{k + 1}", net, cout, 2)
    net = tf.nn.avg_pool3d(net, [1, 3, 3, 3, 1], [1, 2, 2, 2, 1], "VALID")
    return affine_head(net, spatial(x))


BUILDERS = {"VTN": vtn, "VoxelMorph": voxelmorph, "LDR": ldr}


def warp(image, flow):
    """Pull-back trilinear warp with border clamping, as the TF codes' dense spatial transformer:
    ``out(p) = image(p + flow(p))``, flow channel ``c`` along array axis ``c`` (channels last)."""
    size = spatial(image)
    axes = [tf.range(n, dtype=tf.float32) for n in size]
    points = tf.stack(tf.meshgrid(*axes, indexing="ij"), -1)[None] + flow
    floor = tf.floor(points)
    frac = points - floor
    floor = tf.cast(floor, tf.int32)
    upper = tf.constant([n - 1 for n in size], tf.int32)
    out = 0.0
    for corner in ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)):
        index = tf.clip_by_value(floor + tf.constant(corner, tf.int32), 0, upper)
        weight = 1.0
        for axis, c in enumerate(corner):
            weight = weight * (frac[..., axis] if c else 1.0 - frac[..., axis])
        out = out + weight[..., None] * tf.gather_nd(image, index, batch_dims=1)
    return out


def chain(fixed, moving, stems, rep):
    """The TF codes' cascade: each stem sees the fixed image and the moving image warped by the
    flow so far; an affine first stem composes exactly (``(I + W) u + affine``), later stems by
    ``warp(agg, u) + u``; a stem is applied ``rep`` times with shared weights."""
    agg = warped = W = None
    for stem, kind, channels, multiplier in stems:
        for r in range(1 if kind.endswith("Affine") else rep):
            with tf1.variable_scope(stem, reuse=r > 0):
                x = tf.concat([fixed, moving if warped is None else warped], 4)
                if kind.endswith("Affine"):
                    out = (vtn_affine if kind == "VTNAffine" else ldr_affine)(x)
                else:
                    out = BUILDERS[kind](x, channels, multiplier)
            flow = out["flow"]
            if agg is None:
                agg = flow
            elif W is not None:
                agg = tf.einsum("bij,bxyzj->bxyzi", W + tf.eye(3), flow) + agg
                W = None
            else:
                agg = warp(agg, flow) + flow
            if "W" in out:
                W = out["W"]
            warped = warp(moving, agg)
    return {"flow": agg, "warped": warped}


def save_reference(folder, stems, size, step=100, extras=True, seed=0, cascade=False, rep=1, flow_gain=1.0):
    """Build ``stems`` (``[(stem name, kind, channels, flow multiplier)]``, kind in VTN, VoxelMorph,
    LDR, VTNAffine, LDRAffine) under ``gaffdfrm/``, save a TF-1 checkpoint ``folder/model-<step>``
    (with Adam slots, and LDR_ALDK-style critic variables when ``extras``) and return
    ``(prefix, forward)``: ``forward(fixed, moving)`` (channels-last numpy) runs every stem on the
    same pair and returns ``{stem: {output: ndarray}}``; with ``cascade``, the stems run as the TF
    codes' cascade (``rep`` times each) and ``forward`` returns ``{"cascade": {"flow", "warped"}}``.
    ``flow_gain`` scales the initial weights of the deformable networks' flow layers (random networks
    otherwise output flows of tens of voxels, which a later stem amplifies chaotically)."""
    FLOW_LAYER_GAIN["gain"] = flow_gain
    try:
        return _save_reference(folder, stems, size, step, extras, seed, cascade, rep)
    finally:
        FLOW_LAYER_GAIN["gain"] = 1.0


def _save_reference(folder, stems, size, step, extras, seed, cascade, rep):
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        fixed = tf1.placeholder(tf.float32, [None] + list(size) + [1], "voxel1")
        moving = tf1.placeholder(tf.float32, [None] + list(size) + [1], "voxel2")
        x = tf.concat([fixed, moving], 4)
        outputs = {}
        with tf1.variable_scope(SCOPE):
            if cascade:
                outputs["cascade"] = chain(fixed, moving, stems, rep)
            for stem, kind, channels, multiplier in ([] if cascade else stems):
                with tf1.variable_scope(stem):
                    if kind == "VTNAffine":
                        outputs[stem] = vtn_affine(x)
                    elif kind == "LDRAffine":
                        outputs[stem] = ldr_affine(x)
                    else:
                        outputs[stem] = BUILDERS[kind](x, channels, multiplier)
            if extras:
                with tf1.variable_scope("d_/h0_conv2d"):
                    tf1.get_variable("w", [5, 5, 5, 3, 4])
                    tf1.get_variable("biases", [4])
        if extras:
            loss = tf.add_n([tf.reduce_mean(v) for o in outputs.values() for v in o.values()])
            tf1.train.AdamOptimizer(1e-4).minimize(loss)
        saver = tf1.train.Saver(max_to_keep=None)
        session = tf1.Session(graph=graph)
        session.run(tf1.global_variables_initializer())
        prefix = saver.save(session, os.path.join(folder, "model"), global_step=step, write_meta_graph=False)

    def forward(fixed_np, moving_np):
        with graph.as_default():
            return session.run(outputs, {fixed: fixed_np, moving: moving_np})

    forward.close = session.close
    return prefix, forward


def save_variables(folder, values: dict, step: int = 100) -> str:
    """Save ``{name: ndarray}`` as a TF-1 checkpoint ``folder/model-<step>`` (the fault tests'
    edited checkpoints); returns the prefix."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf1.get_variable(name.replace("/", "__"), initializer=np.asarray(v))
                     for name, v in values.items()}
        saver = tf1.train.Saver(var_list=variables)
        with tf1.Session(graph=graph) as session:
            session.run(tf1.global_variables_initializer())
            return saver.save(session, os.path.join(folder, "model"), global_step=step, write_meta_graph=False)


def load_variables(prefix) -> dict:
    """``{name: ndarray}`` of a TF checkpoint, read by TensorFlow itself."""
    reader = tf1.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
