//! The parts of an ONNX model (`onnx.proto`, IR version 3 and later) that reading weights out of
//! a graph needs: the graph's nodes (name, operator, inputs, outputs, tensor/number attributes)
//! and its initializers (named constant tensors), borrowing the file's bytes.

use std::collections::HashMap;

use super::wire::{push_floats, push_ints, Fields, Value};
use super::Res;

/// ONNX `TensorProto.DataType` values read here.
const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
const DOUBLE: i32 = 11;

/// A tensor stored in the graph (an initializer, or a `Constant` node's `value`).
#[derive(Debug, Default)]
pub(crate) struct TensorData<'a> {
    /// Its name (empty for a `Constant` node's value).
    pub name: &'a str,
    /// Its shape.
    pub dims: Vec<i64>,
    data_type: i32,
    raw: Option<&'a [u8]>,
    floats: Vec<f32>,
    ints: Vec<i64>,
    external: bool,
}

impl<'a> TensorData<'a> {
    fn parse(msg: &'a [u8]) -> Res<Self> {
        let mut t = TensorData::default();
        let mut f = Fields::new(msg);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => push_ints(v, "TensorProto.dims", &mut t.dims)?,
                2 => t.data_type = v.varint("TensorProto.data_type")? as i32,
                4 => push_floats(v, "TensorProto.float_data", &mut t.floats)?,
                5 | 7 => push_ints(v, "TensorProto.int_data", &mut t.ints)?,
                8 => t.name = v.text("TensorProto.name")?,
                9 => t.raw = Some(v.bytes("TensorProto.raw_data")?),
                13 => t.external = true,
                14 => t.external |= v.varint("TensorProto.data_location")? == 1,
                _ => {}
            }
        }
        Ok(t)
    }

    fn label(&self) -> String {
        if self.name.is_empty() {
            "a constant".into()
        } else {
            format!("tensor `{}`", self.name)
        }
    }

    /// The number of elements its shape holds.
    pub(crate) fn numel(&self) -> Res<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| {
            usize::try_from(d)
                .ok()
                .and_then(|d| n.checked_mul(d))
                .ok_or_else(|| format!("{}: invalid shape {:?}", self.label(), self.dims))
        })
    }

    /// The shape as sizes.
    pub(crate) fn shape(&self) -> Res<Vec<usize>> {
        self.numel()?;
        Ok(self.dims.iter().map(|&d| d as usize).collect())
    }

    fn check_stored(&self) -> Res<()> {
        if self.external {
            return Err(format!(
                "{}: its data is stored outside the .onnx file (external data), which is not \
                 supported; save the model with its weights inside",
                self.label()
            ));
        }
        Ok(())
    }

    fn raw_values<const N: usize>(&self, raw: &[u8], width: &str) -> Res<Vec<[u8; N]>> {
        let n = self.numel()?;
        if raw.len() != n.saturating_mul(N) {
            return Err(format!(
                "{}: {} bytes of data for shape {:?} of {width}",
                self.label(),
                raw.len(),
                self.dims
            ));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| c.try_into().expect("N bytes"))
            .collect())
    }

    /// The values of a float32 (or float64) tensor, in row-major order.
    pub(crate) fn to_f32(&self) -> Res<Vec<f32>> {
        self.check_stored()?;
        let values: Vec<f32> = match (self.data_type, self.raw) {
            (FLOAT, Some(raw)) => self
                .raw_values::<4>(raw, "float32")?
                .into_iter()
                .map(f32::from_le_bytes)
                .collect(),
            (FLOAT, None) => self.floats.clone(),
            (DOUBLE, Some(raw)) => self
                .raw_values::<8>(raw, "float64")?
                .into_iter()
                .map(|b| f64::from_le_bytes(b) as f32)
                .collect(),
            (t, _) => {
                return Err(format!(
                    "{}: data type {t} where float32 was expected",
                    self.label()
                ))
            }
        };
        if values.len() != self.numel()? {
            return Err(format!(
                "{}: {} values for shape {:?}",
                self.label(),
                values.len(),
                self.dims
            ));
        }
        Ok(values)
    }

    /// The values of an int64 (or int32) tensor, in row-major order.
    pub(crate) fn to_i64(&self) -> Res<Vec<i64>> {
        self.check_stored()?;
        let values: Vec<i64> = match (self.data_type, self.raw) {
            (INT64, Some(raw)) => self
                .raw_values::<8>(raw, "int64")?
                .into_iter()
                .map(i64::from_le_bytes)
                .collect(),
            (INT32, Some(raw)) => self
                .raw_values::<4>(raw, "int32")?
                .into_iter()
                .map(|b| i64::from(i32::from_le_bytes(b)))
                .collect(),
            (INT64 | INT32, None) => self.ints.clone(),
            (t, _) => {
                return Err(format!(
                    "{}: data type {t} where an integer was expected",
                    self.label()
                ))
            }
        };
        if values.len() != self.numel()? {
            return Err(format!(
                "{}: {} values for shape {:?}",
                self.label(),
                values.len(),
                self.dims
            ));
        }
        Ok(values)
    }
}

/// An attribute of a node: a tensor or a float (others are not needed and skipped).
#[derive(Debug)]
pub(crate) enum Attribute<'a> {
    Tensor(TensorData<'a>),
    Float(f32),
    Other,
}

/// A node of the graph.
#[derive(Debug, Default)]
pub(crate) struct Node<'a> {
    pub name: &'a str,
    pub op_type: &'a str,
    pub inputs: Vec<&'a str>,
    pub outputs: Vec<&'a str>,
    pub attributes: Vec<(&'a str, Attribute<'a>)>,
}

impl<'a> Node<'a> {
    fn parse(msg: &'a [u8]) -> Res<Self> {
        let mut n = Node::default();
        let mut f = Fields::new(msg);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => n.inputs.push(v.text("NodeProto.input")?),
                2 => n.outputs.push(v.text("NodeProto.output")?),
                3 => n.name = v.text("NodeProto.name")?,
                4 => n.op_type = v.text("NodeProto.op_type")?,
                5 => n
                    .attributes
                    .push(parse_attribute(v.bytes("NodeProto.attribute")?)?),
                _ => {}
            }
        }
        Ok(n)
    }

    /// The attribute `name`, if the node has it.
    pub(crate) fn attribute(&self, name: &str) -> Option<&Attribute<'a>> {
        self.attributes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a)
    }
}

fn parse_attribute(msg: &[u8]) -> Res<(&str, Attribute<'_>)> {
    let (mut name, mut attr) = ("", Attribute::Other);
    let mut f = Fields::new(msg);
    while let Some((field, v)) = f.next_field()? {
        match (field, v) {
            (1, v) => name = v.text("AttributeProto.name")?,
            (2, Value::Fixed32(bits)) => attr = Attribute::Float(f32::from_bits(bits)),
            (5, v) => attr = Attribute::Tensor(TensorData::parse(v.bytes("AttributeProto.t")?)?),
            _ => {}
        }
    }
    Ok((name, attr))
}

/// The main graph of an ONNX model.
pub(crate) struct Graph<'a> {
    /// Nodes in the file's (topological) order.
    pub nodes: Vec<Node<'a>>,
    /// Initializers by name.
    pub initializers: HashMap<&'a str, TensorData<'a>>,
    producers: HashMap<&'a str, usize>,
}

impl<'a> Graph<'a> {
    /// Parses a serialized `ModelProto`.
    pub(crate) fn parse_model(data: &'a [u8]) -> Res<Self> {
        let mut graph = None;
        let mut f = Fields::new(data);
        while let Some((field, v)) = f.next_field()? {
            if field == 7 {
                graph = Some(v.bytes("ModelProto.graph")?);
            }
        }
        let graph = graph.ok_or("no graph (not an ONNX model?)")?;
        let (mut nodes, mut initializers) = (Vec::new(), HashMap::new());
        let mut f = Fields::new(graph);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => nodes.push(Node::parse(v.bytes("GraphProto.node")?)?),
                5 => {
                    let t = TensorData::parse(v.bytes("GraphProto.initializer")?)?;
                    initializers.insert(t.name, t);
                }
                _ => {}
            }
        }
        let producers = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (*o, i)))
            .collect();
        Ok(Self {
            nodes,
            initializers,
            producers,
        })
    }

    /// The node whose output is `value`, if a node makes it.
    pub(crate) fn producer(&self, value: &str) -> Option<&Node<'a>> {
        self.producers.get(value).map(|&i| &self.nodes[i])
    }

    /// The nodes that take `value` as an input.
    pub(crate) fn consumers<'g>(&'g self, value: &'g str) -> impl Iterator<Item = &'g Node<'a>> {
        self.nodes.iter().filter(move |n| n.inputs.contains(&value))
    }

    /// The constant tensor `value` is: an initializer, or the output of a `Constant` node.
    pub(crate) fn constant(&self, value: &str) -> Option<&TensorData<'a>> {
        if let Some(t) = self.initializers.get(value) {
            return Some(t);
        }
        let node = self.producer(value)?;
        if node.op_type != "Constant" {
            return None;
        }
        match node.attribute("value") {
            Some(Attribute::Tensor(t)) => Some(t),
            _ => None,
        }
    }
}
