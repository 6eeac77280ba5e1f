// spmac_pnr_top: the place-and-route harness of spmac_array on a real part.
//
// The array's streams are hundreds of bits wide (G*M*AB in, P*OUTW out), more than a package has pins, and in
// a system they connect to on-chip logic (the DRAM-fed system's FIFOs), not to pads. The harness keeps every
// bit live through a few pins, with registers on both sides so every path that reaches the array's ports
// starts or ends at a flip-flop, as it would inside a system:
//   - activations: a shift register loaded one bit per cycle from `din`, presented as s_axis_tdata;
//   - results: registered, then XOR-folded to FOLD bits and registered again onto `dout`;
//   - valid, ready, last and cfg_shift are registered from and to their pins.
// The fold keeps every result bit observable, so synthesis removes nothing of the array. The harness adds
// about G*M*AB + P*OUTW + FOLD + 2*SHW flip-flops and the fold's LUTs to the count of the array.

`default_nettype none

module spmac_pnr_top #(
    parameter int AW   = spmac_pkg::G * spmac_pkg::M * spmac_pkg::AB,   // s_axis_tdata bits
    parameter int OW   = spmac_pkg::P * spmac_pkg::OUTW,                // m_axis_tdata bits
    parameter int SHW  = spmac_pkg::SHW,
    parameter int FOLD = 16                                              // dout pins
) (
    input  wire logic             clk,
    input  wire logic             rst_n,
    input  wire logic             din,          // activation bits, shifted in one per cycle
    input  wire logic             in_valid,
    input  wire logic             in_last,
    output      logic             in_ready,
    input  wire logic [SHW-1:0]   shift,
    input  wire logic             out_ready,
    output      logic             out_valid,
    output      logic             out_last,
    output      logic [FOLD-1:0]  dout,         // the result beat XOR-folded to FOLD bits
    output      logic             err
);
    logic [AW-1:0] act;
    logic s_valid, s_last, m_ready;
    logic [SHW-1:0] cfg_shift;
    always_ff @(posedge clk) begin
        act <= {act[AW-2:0], din};
        s_valid <= in_valid; s_last <= in_last; m_ready <= out_ready; cfg_shift <= shift;
    end

    logic s_ready, m_valid, m_last, err_tlast;
    logic [OW-1:0] m_data;
    spmac_array u_array (
        .clk, .rst_n, .cfg_shift,
        .s_axis_tvalid(s_valid), .s_axis_tready(s_ready), .s_axis_tdata(act), .s_axis_tlast(s_last),
        .m_axis_tvalid(m_valid), .m_axis_tready(m_ready), .m_axis_tdata(m_data), .m_axis_tlast(m_last),
        .err_tlast
    );

    logic [OW-1:0] data_q;
    logic [FOLD-1:0] folded;
    integer b;
    always_comb begin
        folded = '0;
        for (b = 0; b < OW; b = b + 1) folded[b % FOLD] = folded[b % FOLD] ^ data_q[b];
    end
    always_ff @(posedge clk) begin
        data_q <= m_data;
        dout <= folded;
        in_ready <= s_ready; out_valid <= m_valid; out_last <= m_last; err <= err_tlast;
    end
endmodule

`default_nettype wire
