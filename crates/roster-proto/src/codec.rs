//! The codec of every generated gRPC client and server: prost's encoder,
//! and a decoder that reads each message from its bytes as one contiguous
//! buffer (taken from tonic's, not copied), which decodes a megabyte
//! snapshot chunk much faster than reading through tonic's `DecodeBuf`.

use std::marker::PhantomData;

use bytes::Buf as _;
use prost::Message;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};

/// Encodes `T`, decodes `U` (see the module doc).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Contiguous<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Contiguous::default()
    }
}

/// Decodes a `U` from the message's bytes as one buffer.
#[derive(Debug)]
pub struct Contiguous<U>(PhantomData<U>);

impl<U> Default for Contiguous<U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<U: Message + Default> Decoder for Contiguous<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Splits tonic's buffer: no copy.
        let bytes = src.copy_to_bytes(src.remaining());
        // As tonic's own prost codec answers an unreadable message.
        U::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}
