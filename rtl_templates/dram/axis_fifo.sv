// axis_fifo: a synchronous first-word-fall-through FIFO with valid/ready on both sides.
//
// DEPTH entries of W bits (pack tlast/tuser into W). `count` is the occupancy, so a producer that must
// never be back-pressured (an AXI read master reserving room for its bursts) can see the free space.
// s_ready is a register function of the occupancy only; m_data comes from the storage array.

`default_nettype none

module axis_fifo #(
    parameter int W     = 8,    // data bits
    parameter int DEPTH = 16    // entries, a power of two >= 2
) (
    input  wire logic                       clk,
    input  wire logic                       rst_n,
    input  wire logic                       s_valid,
    output      logic                       s_ready,
    input  wire logic [W-1:0]               s_data,
    output      logic                       m_valid,
    input  wire logic                       m_ready,
    output      logic [W-1:0]               m_data,
    output      logic [$clog2(DEPTH+1)-1:0] count
);
    localparam int AW = $clog2(DEPTH);

    initial begin
        if (W < 1) $fatal(1, "axis_fifo: W must be >= 1, got %0d", W);
        if (DEPTH < 2 || (1 << AW) != DEPTH) $fatal(1, "axis_fifo: DEPTH must be a power of two >= 2, got %0d", DEPTH);
    end

    logic [W-1:0] mem [DEPTH];
    logic [AW:0]  wr_ptr, rd_ptr;   // one extra bit tells full from empty

    wire logic full  = (wr_ptr[AW] != rd_ptr[AW]) && (wr_ptr[AW-1:0] == rd_ptr[AW-1:0]);
    wire logic empty = wr_ptr == rd_ptr;
    assign s_ready = !full;
    assign m_valid = !empty;
    assign m_data  = mem[rd_ptr[AW-1:0]];
    assign count   = ($clog2(DEPTH+1))'(wr_ptr - rd_ptr);

    always_ff @(posedge clk)
        if (s_valid && s_ready) mem[wr_ptr[AW-1:0]] <= s_data;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            wr_ptr <= '0; rd_ptr <= '0;
        end else begin
            if (s_valid && s_ready) wr_ptr <= wr_ptr + 1'b1;
            if (m_valid && m_ready) rd_ptr <= rd_ptr + 1'b1;
        end
endmodule

`default_nettype wire
